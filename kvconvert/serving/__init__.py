"""Probe scripts that serving engines run in their own interpreters (docs/check.md).

Each file here is standalone: it imports only its engine and the standard library, because it
runs where kvconvert may not be installed (``kvconvert check --engine vllm --python PATH``).
"""
