"""Probe scripts that serving engines run in their own interpreters (docs/check.md).

Each probe is a script that imports only its engine, the standard library and ``protocol.py``
(the request/result protocol, found beside it), because it runs where kvconvert may not be
installed (``kvconvert check --engine vllm --python PATH``).
"""
