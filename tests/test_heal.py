"""Healing by distillation: KL drops, LoRA merges exactly, interrupts are safe and resumable."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import kvconvert
from kvconvert.calibration.data import sample_from_model
from kvconvert.cli import main
from kvconvert.errors import KVConvertError
from kvconvert.evaluate import kl_per_token
from kvconvert.heal import HealOptions, heal, state_folder
from kvconvert.heal.run import lr_schedule
from tests.conftest import FAST, load, tensors, token_ids, torchrun

#: Small enough for a few seconds per run on a laptop CPU.
SMALL = dict(batch_size=4, seq_len=32, num_samples=16, eval_samples=4, seed=0)


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    """The tiny Llama (4 KV heads) mean-pooled to 2 KV heads: a poor start, worth healing."""
    out = tmp_path_factory.mktemp("heal") / "conv"
    kvconvert.convert(str(tiny_models["llama"]), str(out), kv_heads=2, method="mean", **FAST)
    return tiny_models["llama"], out


def _opts(converted, out, **kw) -> HealOptions:
    src, conv = converted
    return HealOptions(original=str(src), converted=str(conv), output=str(out), **{**SMALL, **kw})


def test_kl_drops_and_format_is_kept(converted, tmp_path):
    src, conv = converted
    opts = _opts(converted, tmp_path / "healed", steps=40, lr=1e-2, batch_size=8, num_samples=128)
    out = heal(opts, progress=False)
    orig = load(src)
    ids = sample_from_model(orig, 1, num_samples=8, seq_len=32, batch_size=8, seed=99)
    kl_conv = kl_per_token(orig, load(conv), ids)
    kl_healed = kl_per_token(orig, load(out), ids)
    assert kl_healed < 0.8 * kl_conv, (kl_conv, kl_healed)  # measured: 0.38 -> 0.24

    # Same files; config and side files byte-identical; untouched tensors bit-exact.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in conv.iterdir())
    assert (out / "config.json").read_bytes() == (conv / "config.json").read_bytes()
    before, after = load_file(conv / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if "mlp" in k or "embed" in k)

    report = json.loads((out / "kvconvert.json").read_text())
    assert report["recipe"]["method"] == "mean"  # the conversion's report is kept
    (run,) = report["heal"]
    assert run["steps"] == 40 and run["data"]["source"] == "self"
    assert run["kl_after"] < 0.8 * run["kl_before"] and run["final_loss"] > 0
    assert sorted(run["trained"]["tensors"]) == sorted(changed)
    assert "## Healing" in (out / "README.md").read_text()
    assert not state_folder(out).exists()


def test_short_heal_samples_only_what_it_trains_on(converted, tmp_path, monkeypatch):
    """3 steps of 4 sequences read 12: the default 2048 are not sampled (a short heal stays
    short); the held-out sequences are still made."""
    calls = []
    import kvconvert.heal.data as data_mod

    real = data_mod.sample_from_model

    def counting(model, bos, n, *args, **kwargs):
        calls.append(n)
        return real(model, bos, n, *args, **kwargs)

    monkeypatch.setattr(data_mod, "sample_from_model", counting)
    out = heal(_opts(converted, tmp_path / "h", steps=3, num_samples=2048), progress=False)
    assert calls == [3 * 4 + 4]
    (run,) = json.loads((out / "kvconvert.json").read_text())["heal"]
    assert run["data"]["sequences"] == 12 and run["data"]["eval_sequences"] == 4


def test_lora_merged_output_equals_in_memory_model(converted, tmp_path):
    ids = token_ids(2, 24, seed=3)
    seen = {}

    def grab(run, step, loss):
        if step == run.opts.steps:
            with torch.inference_mode():
                seen["logits"] = run.student.eval()(input_ids=ids).logits
            assert run.lora  # the student really carries adapters

    out = heal(_opts(converted, tmp_path / "lora", steps=8, lora=2, lr=1e-2), False, None, grab)
    merged = load(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.inference_mode():
        got = merged(input_ids=ids).logits
        start = load(converted[1])(input_ids=ids).logits
    assert (seen["logits"] - start).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(got, seen["logits"], atol=2e-5, rtol=1e-5)


def test_interrupt_leaves_output_untouched_and_resume_matches(converted, tmp_path):
    full = heal(_opts(converted, tmp_path / "full", steps=12, save_every=4), progress=False)

    out = tmp_path / "out"
    shutil.copytree(converted[1], out)  # an earlier kvconvert output, which --overwrite replaces
    (out / "keep.txt").write_text("previous output")
    previous = sorted(p.name for p in out.iterdir())

    def stop_at_6(run, step, loss):
        if step == 6:
            raise KeyboardInterrupt

    opts = _opts(converted, out, steps=12, save_every=4, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        heal(opts, False, None, stop_at_6)
    assert sorted(p.name for p in out.iterdir()) == previous  # untouched
    state = torch.load(state_folder(out) / "state.pt", weights_only=True)
    assert state["step"] == 6  # saved on Ctrl-C, not only at step 4

    with pytest.raises(KVConvertError, match="differs in lr"):
        heal(_opts(converted, out, steps=12, overwrite=True, resume=True, lr=1e-4), False)
    # A state saved before --final-lr existed (no such key) resumes as the 0.1 it used.
    fingerprint = json.loads(state["fingerprint"])
    del fingerprint["final_lr"]
    state["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    torch.save(state, state_folder(out) / "state.pt")
    with pytest.raises(KVConvertError, match="differs in final_lr"):
        heal(_opts(converted, out, steps=12, overwrite=True, resume=True, final_lr=0.5), False)

    resumed_from = []
    heal(
        _opts(converted, out, steps=12, save_every=4, overwrite=True, resume=True),
        False,
        None,
        lambda run, step, loss: resumed_from.append(step),
    )
    assert resumed_from[0] == 7 and not state_folder(out).exists()
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run
    assert json.loads((out / "kvconvert.json").read_text())["heal"][0]["steps"] == 12


def test_on_policy_trains_on_the_students_own_text_and_resumes_exactly(
    converted, tmp_path, monkeypatch
):
    """--on-policy 0.5: half of each micro-batch is the student's continuation of the first
    quarter of a training sequence, written by the student as it is at that step; the run
    differs from one on the training text alone, and an interrupted run resumes to the
    same weights (the student's text is seeded by its place in the run)."""
    import kvconvert.heal.trainer as trainer_mod

    seen = []
    real = trainer_mod.Trainer.loss_on

    def spy(self, ids):
        seen.append(ids.clone())
        return real(self, ids)

    monkeypatch.setattr(trainer_mod.Trainer, "loss_on", spy)
    kw = dict(steps=6, save_every=0, lr=1e-2)
    plain = heal(_opts(converted, tmp_path / "plain", **kw), progress=False)
    text = [ids.clone() for ids in seen]
    seen.clear()
    full = heal(_opts(converted, tmp_path / "full", on_policy=0.5, **kw), progress=False)
    assert len(seen) == len(text) == 6
    for own, given in zip(seen, text, strict=True):
        assert torch.equal(own[2:], given[2:])  # the other half: the training text
        assert torch.equal(own[:2, :8], given[:2, :8])  # the prompt: its first quarter
        assert not torch.equal(own[:2, 8:], given[:2, 8:])  # the rest: the student's
    a, b = load_file(plain / "model.safetensors"), load_file(full / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((full / "kvconvert.json").read_text())["heal"][0]["options"]["on_policy"] == 0.5
    )

    def stop_at_3(run, step, loss):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        heal(_opts(converted, out, on_policy=0.5, **kw), False, None, stop_at_3)
    with pytest.raises(KVConvertError, match="differs in on_policy"):
        heal(_opts(converted, out, resume=True, **kw), False)
    resumed = heal(_opts(converted, out, on_policy=0.5, resume=True, **kw), False)
    c = load_file(resumed / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    with pytest.raises(KVConvertError, match="on_policy: a share"):
        heal(_opts(converted, tmp_path / "bad", on_policy=1.5), False)


def test_convert_with_heal_steps_cli(tiny_models, tmp_path):
    out = tmp_path / "o"
    args = [str(tiny_models["mistral"]), "--kv-heads", "2", "-o", str(out), "-q"]
    args += ["--num-samples", "4", "--seq-len", "32", "--heal-steps", "3"]
    args += ["--heal-seq-len", "16", "--heal-num-samples", "8", "--heal-batch-size", "2"]
    args += ["--heal-final-lr", "0.01"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "kvconvert.json").read_text())
    assert report["target"]["num_key_value_heads"] == 2
    assert report["heal"][0]["steps"] == 3 and report["heal"][0]["command"] == report["command"]
    assert report["heal"][0]["options"]["final_lr"] == 0.01
    assert load(out).config.num_key_value_heads == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


#: Run by torchrun: the CLI run (argv), then the same run through the API, interrupted by a
#: KeyboardInterrupt on every rank after step 3 (rank 0 saves the state, as on Ctrl-C).
DDP_SCRIPT = """
import ast
import sys
from kvconvert.cli import main
from kvconvert.heal import HealOptions, heal

main(sys.argv[2:], standalone_mode=False)
def stop(run, step, loss):
    if step == 3:
        raise KeyboardInterrupt
try:
    heal(HealOptions(**ast.literal_eval(sys.argv[1])), False, None, stop)
except KeyboardInterrupt:
    pass
"""


def test_two_gloo_ranks_equal_one_process_with_double_grad_accum(converted, tmp_path):
    """torchrun with DDP: 2 ranks x --grad-accum 1 see the batches of 1 process x 2 (the
    training text, sampled from the original, is sampled on rank 0 and broadcast); a state
    saved under torchrun resumes in one process with --grad-accum 2."""
    src, conv = converted
    kw = dict(steps=6, lr=1e-2, batch_size=2, seq_len=16, num_samples=12, eval_samples=2)
    one = heal(_opts(converted, tmp_path / "one", grad_accum=2, **kw), progress=False)
    args = ["heal", str(src), str(conv), "-o", str(tmp_path / "two"), "-q", "--seed", "0"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    part = dict(original=str(src), converted=str(conv), output=str(tmp_path / "part"), **kw)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    torchrun([str(tmp_path / "ddp.py"), repr(part), *args])

    a, b = tensors(one), tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], load_file(conv / "model.safetensors")[k])]
    assert moved  # training changed something, so the comparison means something
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)
    r1 = json.loads((one / "kvconvert.json").read_text())["heal"][0]
    r2 = json.loads((tmp_path / "two" / "kvconvert.json").read_text())["heal"][0]
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["data"]["tokens_seen"] == r2["data"]["tokens_seen"]
    assert r2["kl_after"] == pytest.approx(r1["kl_after"], rel=1e-4)
    assert not state_folder(tmp_path / "two").exists()

    assert not (tmp_path / "part").exists()  # interrupted: state only
    assert torch.load(state_folder(tmp_path / "part") / "state.pt", weights_only=True)["step"] == 3
    with pytest.raises(KVConvertError, match="differs in grad_accum"):
        heal(_opts(converted, tmp_path / "part", resume=True, **kw), False)
    resumed = heal(_opts(converted, tmp_path / "part", resume=True, grad_accum=2, **kw), False)
    c = tensors(resumed)
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=1e-5, atol=1e-5, msg=name)


def test_clear_errors(converted, tiny_models, tmp_path):
    src, conv = converted
    with pytest.raises(KVConvertError, match="needs a CUDA device"):
        heal(_opts(converted, tmp_path / "a", precision="bf16", device="cpu"), False)
    with pytest.raises(KVConvertError, match="does not combine with --train all"):
        heal(_opts(converted, tmp_path / "b", lora=4, train="all"), False)
    same = tmp_path / "same"
    shutil.copytree(src, same)
    with pytest.raises(KVConvertError, match="nothing to heal"):
        heal(_opts((src, same), tmp_path / "c"), False)
    res = CliRunner().invoke(main, ["heal", str(src), str(conv), "-o", str(conv)])
    assert res.exit_code != 0 and "already exists" in res.output
    res = CliRunner().invoke(main, ["heal", str(src), str(conv), "-o", "x", "--final-lr", "2"])
    assert res.exit_code != 0 and "final_lr: a fraction of --lr in [0, 1], got 2.0" in res.output


def test_lr_schedule_warms_up_then_decays_to_final_lr():
    opts = HealOptions(original="a", converted="b", output="c", steps=1000, warmup=0.1)
    lrs = [lr_schedule(replace(opts, final_lr=0.01), 2.0, s) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.02) and lrs[99] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:], strict=False))  # never rises again
    assert lrs[-1] == pytest.approx(0.02, abs=1e-4)  # 0.01 x peak at the end of the run
    assert lr_schedule(opts, 2.0, 999) == pytest.approx(0.2, abs=1e-3)  # default: 0.1 x peak
    constant = replace(opts, schedule="constant", final_lr=0.0)
    assert lr_schedule(constant, 2.0, 999) == 2.0


REMOTE = {
    "rope-keys project": dict(kv_heads=2, rope_keys="project", method="mean"),
    "gqa,pod": dict(target="gqa,pod", kv_heads=2, method="mean", kv_saving=0.1, sink=2, recent=8),
    "pod": dict(target="pod", kv_saving=0.1, sink=2, recent=8),
}


@pytest.mark.parametrize("kind", list(REMOTE))
def test_healed_remote_code_output_stays_loadable(tiny_models, tmp_path, kind, capsys):
    """Remote-code outputs (key projection, PoD) keep their code and config, load with
    trust_remote_code=True, generate with their own cache, and (GQA ones) get closer to the
    original."""
    src = tiny_models["llama"]
    conv = kvconvert.convert(str(src), str(tmp_path / "conv"), **{**FAST, **REMOTE[kind]})
    train = "all" if kind == "pod" else "attention"
    if kind == "pod":  # a PoD map where no layer borrows changes nothing: nothing to heal
        (tmp_path / "identity.json").write_text("[0, 1]")
        same = kvconvert.convert(
            str(src), str(tmp_path / "same"), target="pod", pod_map=str(tmp_path / "identity.json")
        )
        with pytest.raises(KVConvertError, match="nothing to heal.*--train all"):
            heal(_opts((src, same), tmp_path / "refused", steps=2), progress=False)
        assert not (tmp_path / "refused").exists()
    opts = _opts((src, conv), tmp_path / "healed", steps=30, lr=1e-2, batch_size=8, train=train)
    out = heal(opts, progress=False)
    code = sorted(p.name for p in conv.glob("*.py"))
    assert code and code == sorted(p.name for p in out.glob("*.py"))
    assert all((out / f).read_bytes() == (conv / f).read_bytes() for f in code)
    assert (out / "config.json").read_bytes() == (conv / "config.json").read_bytes()
    orig, before = load(src), load(conv, trust_remote_code=True)
    healed = load(out, trust_remote_code=True)
    assert type(healed).__name__ == type(before).__name__ and "KVConvert" in type(healed).__name__
    ids = sample_from_model(orig, 1, num_samples=8, seq_len=32, batch_size=8, seed=99)
    if kind == "pod":  # a near-exact start (KL ~0.004 here): the weights move, KL may not drop
        (run,) = json.loads((out / "kvconvert.json").read_text())["heal"]
        assert run["trained"]["mode"] == "all" and run["kl_after"] is not None
        if run["kl_after"] >= run["kl_before"]:  # the user is told, and keeps the unhealed
            assert "held-out KL did not drop" in capsys.readouterr().err
            assert run["kept"].startswith("unhealed")
            assert torch.equal(healed.lm_head.weight, before.lm_head.weight)
        else:
            assert not torch.equal(healed.lm_head.weight, before.lm_head.weight)
    else:
        assert kl_per_token(orig, healed, ids) < kl_per_token(orig, before, ids)
    with torch.inference_mode():
        gen = healed.generate(ids[:1, :24], max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, 32)


def test_heal_that_makes_things_worse_keeps_the_unhealed_model(converted, tmp_path, capsys):
    """A learning rate far too high raises the held-out KL: the output keeps the converted
    weights, the report and card say so, and the advice names heal's and convert's flags."""
    src, conv = converted
    out = heal(_opts(converted, tmp_path / "worse", steps=4, lr=5.0), progress=False)
    (run,) = json.loads((out / "kvconvert.json").read_text())["heal"]
    assert run["kl_after"] >= run["kl_before"] and run["kept"].startswith("unhealed")
    a, b = tensors(conv), tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    err = capsys.readouterr().err
    assert "keeps the unhealed model" in err and "--heal-lr" in err and "--lr" in err
    assert "these weights are the unhealed ones" in (out / "README.md").read_text()


def test_healed_card_states_the_healed_fidelity(converted, tmp_path):
    out = heal(_opts(converted, tmp_path / "h", steps=6, lr=1e-2), progress=False)
    rep = json.loads((out / "kvconvert.json").read_text())
    card = (out / "README.md").read_text()
    assert "No fidelity measurement" not in card and card.count("## Fidelity") == 1
    kl = rep["heal"][-1]["kl_after"]
    assert f"| kl nats per token | {round(kl, 6):.4g} |" in card


def test_ctrl_c_while_sampling_keeps_the_text_and_resume_continues(
    converted, tmp_path, monkeypatch
):
    """Ctrl-C during the sampling of the training text keeps the batches sampled so far;
    --resume samples the rest and ends bit-identical to an uninterrupted run."""
    import kvconvert.heal.data as data_mod

    monkeypatch.setattr(data_mod, "SAMPLE_BATCH", 8)  # 20 sequences: three batches
    full = heal(_opts(converted, tmp_path / "full", steps=4), progress=False)
    sample, calls = data_mod.sample_from_model, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    monkeypatch.setattr(data_mod, "sample_from_model", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        heal(_opts(converted, out, steps=4), progress=False)
    saved = torch.load(state_folder(out) / "sampled.pt", weights_only=True)
    assert len(saved["tokens"]) == 1 and not out.exists()
    monkeypatch.setattr(data_mod, "sample_from_model", sample)
    with pytest.raises(KVConvertError, match="holds an interrupted heal; add --resume"):
        heal(_opts(converted, out, steps=4), progress=False)
    heal(_opts(converted, out, steps=4, resume=True), progress=False)
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state_folder(out).exists()


def test_heal_resume_with_nothing_saved_is_refused(converted, tmp_path):
    with pytest.raises(KVConvertError, match="no interrupted heal to resume"):
        heal(_opts(converted, tmp_path / "o", steps=2, resume=True), progress=False)


def test_pod_output_heals_the_borrowing_layers_only(tiny_models, tmp_path):
    """A PoD output changes no weight; heal trains the attention of the layers that borrow
    keys (here layer 1 of 2), and the held-out KL drops."""
    src = tiny_models["llama"]
    (tmp_path / "map.json").write_text(json.dumps([0, 0]))
    conv = kvconvert.convert(
        str(src),
        str(tmp_path / "pod"),
        target="pod",
        pod_map=str(tmp_path / "map.json"),
        sink=1,
        recent=2,
        progress=False,
    )
    short = HealOptions(original=str(src), converted=str(conv), output=str(tmp_path / "x"))
    with pytest.raises(
        KVConvertError, match=r"seq_len: .* 4 tokens have no distant token.*above 4"
    ):
        heal(replace(short, **{**SMALL, "seq_len": 4, "steps": 1}), progress=False)
    with pytest.raises(KVConvertError, match="gradient_checkpointing: not supported for PoD"):
        heal(replace(short, **{**SMALL, "gradient_checkpointing": True}), progress=False)
    assert not (tmp_path / "x").exists()
    opts = HealOptions(
        original=str(src),
        converted=str(conv),
        output=str(tmp_path / "healed"),
        **{**SMALL, "steps": 40, "lr": 3e-3, "batch_size": 8, "num_samples": 128},
    )
    out = heal(opts, progress=False)
    orig = load(src)
    ids = sample_from_model(orig, 1, num_samples=8, seq_len=32, batch_size=8, seed=99)
    kl_pod = kl_per_token(orig, load(conv, trust_remote_code=True), ids)
    kl_healed = kl_per_token(orig, load(out, trust_remote_code=True), ids)
    assert kl_healed < 0.95 * kl_pod, (kl_pod, kl_healed)  # measured: 0.0099 -> 0.0089
    before, after = load_file(conv / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.self_attn.") for k in changed)


def test_automatic_lengths_give_pod_outputs_distant_tokens_and_keep_step_tokens():
    """Unset --seq-len/--batch-size: 8 x 128 tokens, but a PoD output whose layers borrow keys
    trains on 4 x (sink + recent) tokens (otherwise heal's default would refuse it), with the
    batch shrunk to keep 1024 tokens a step; values a user sets are kept."""
    from types import SimpleNamespace

    def lengths(config, **set_):
        o = HealOptions(original="a", converted="b", output="c", **set_)
        o.resolve_lengths(config)
        return o.seq_len, o.batch_size

    gqa = SimpleNamespace(num_hidden_layers=2)
    borrowing = SimpleNamespace(pod_sink=16, pod_recent=112, pod_map=[[0, 0], [0, 1]])
    identity = SimpleNamespace(pod_sink=16, pod_recent=112, pod_map=[[0, 0], [1, 1]])
    small = SimpleNamespace(pod_sink=1, pod_recent=2, pod_map=[[0], [0]])
    assert lengths(gqa) == (128, 8)
    assert lengths(borrowing) == (512, 2)
    assert lengths(identity) == (128, 8)
    assert lengths(small) == (128, 8)  # never below the default length
    assert lengths(borrowing, seq_len=300) == (300, 3)
    assert lengths(borrowing, batch_size=5) == (512, 5)
