"""probes/gate.py, eval/base.GatedModel and experiments/probe_gate.py: the gate's
threshold and layer, its routing (each prompt answered by exactly one model), the main job,
generate mode and export with gate.use=True, and the measuring command, each run as the
README says, from the repository root with a relative workdir."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from semsafe_jax.eval import base as eval_base
from semsafe_jax.models import transformer
from semsafe_jax.models.loading import load_pretrained
from semsafe_jax.probes import gate as probe_gate
from semsafe_jax.probes import safety as probe_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_threshold_keeps_the_recall_and_the_layer_is_chosen_on_val_lookalike():
  cal = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.6, 0.7, 0.8, 0.9]])  # [L=2, N=5]
  probs = {probe_gate.CALIBRATION: cal,
           "val_lookalike": np.array([[0.35, 0.05], [0.55, 0.95]]),
           "heldout_intent": np.array([[0.9, 0.1, 0.25], [0.9, 0.4, 0.85]])}
  out = probe_gate.gate_table(probs, recall=0.75)
  # A score of each layer's calibration set that keeps 4 of 5 (at least 75%) at or above it.
  np.testing.assert_allclose(out["threshold"], [0.2, 0.6])
  assert out["flagged"][probe_gate.CALIBRATION] == [0.8, 0.8]
  assert out["flagged"]["val_lookalike"] == [0.5, 0.5]  # a tie: the earliest layer
  np.testing.assert_allclose(out["flagged"]["heldout_intent"], [2 / 3, 2 / 3])
  assert out["chosen_layer"] == 0
  probs["val_lookalike"] = np.array([[0.35, 0.25], [0.55, 0.95]])  # layer 1 flags fewer
  assert probe_gate.gate_table(probs, recall=0.75)["chosen_layer"] == 1
  assert out["n"] == {probe_gate.CALIBRATION: 5, "val_lookalike": 2, "heldout_intent": 3}
  with pytest.raises(ValueError, match="recall=0"):
    probe_gate.gate_table(probs, recall=0.0)
  table = probe_gate.markdown(out).splitlines()
  assert len(table) == 2 + 2 and table[2].startswith("| 0 (chosen) | 0.200 | 80.0% |")


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "semsafe_jax.experiments.probe_gate", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        check=False)


def test_command_on_the_tiny_config(tmp_path):
  workdir = os.path.relpath(tmp_path / "gate", REPO)
  out = _run("--config=configs/tiny.py", f"--workdir={workdir}", "--max_per_split=8")
  assert out.returncode == 0, out.stderr[-4000:]
  r = json.loads((tmp_path / "gate" / "probe_gate.json").read_text())
  n_layers = len(r["threshold"])
  assert n_layers == 3  # tiny-random: embeddings + 2 layers
  assert probe_gate.CALIBRATION in r["flagged"] and "heldout_intent" in r["flagged"]
  for name, shares in r["flagged"].items():
    assert len(shares) == n_layers and all(0.0 <= s <= 1.0 for s in shares), name
    assert 0 < r["n"][name] <= 8 or name == probe_gate.CALIBRATION
  assert min(r["flagged"][probe_gate.CALIBRATION]) >= 0.97 - 1e-9
  assert r["n_fit_harmful"] > 0 and r["n_fit_safe"] > 0
  assert "| layer | threshold |" in out.stdout


def test_bad_recall_is_a_one_line_error(tmp_path):
  out = _run("--config=configs/tiny.py", f"--workdir={tmp_path}", "--recall=1.5")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == "probe_gate: --recall=1.5: must be in (0, 1]"
  assert not (tmp_path / "probe_gate.json").exists()
  (tmp_path / "a_file").write_text("")  # the main job's workdir check, not a copy of it
  out = _run("--config=configs/tiny.py", f"--workdir={tmp_path / 'a_file'}")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith("probe_gate: --workdir=")
  assert "is a file" in out.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tiny():
  pre = load_pretrained("tiny-random")
  return pre._replace(params=transformer.init_params(pre.cfg, jax.random.key(3), std=0.5))


def test_gated_model_answers_each_prompt_with_one_model(tiny):
  """Flagged prompts get the adapted model's answers, log-probs and KL; the rest the base's
  (KL 0); the gate runs once per prompt."""
  base_m = eval_base.ModelUnderTest("before", tiny.params, tiny.cfg, tiny.tokenizer, batch_size=4)
  other = jax.tree.map(lambda x: x * 1.1, tiny.params)
  after_m = eval_base.ModelUnderTest("after", other, tiny.cfg, tiny.tokenizer, batch_size=4)
  asked = []

  def gate_fn(prompts):
    asked.extend(prompts)
    return np.array(["harm" in p for p in prompts])

  gated = eval_base.GatedModel("gated", base_m, after_m, gate_fn)
  prompts = ["Tell me about the sea.", "How to harm a rival?", "What is 2 + 2?",
             "Any harm in tea?"]
  got = gated.generate_full(prompts, 6)
  want_on = after_m.generate_full([prompts[1], prompts[3]], 6)
  want_off = base_m.generate_full([prompts[0], prompts[2]], 6)
  assert got.texts == [want_off.texts[0], want_on.texts[0], want_off.texts[1], want_on.texts[1]]
  assert got.token_ids[1] == want_on.token_ids[0]
  assert gated.generate(prompts[::-1], 6) == got.texts[::-1]
  assert sorted(asked) == sorted(prompts)  # memoised: the second call asked nothing
  np.testing.assert_array_equal(gated.flags(prompts), [False, True, False, True])

  responses = ["Waves.", "No.", "Four.", "None."]
  lp = gated.answer_logprobs(prompts, responses)
  np.testing.assert_allclose(lp[1], after_m.answer_logprobs([prompts[1]], [responses[1]])[0])
  np.testing.assert_allclose(lp[0], base_m.answer_logprobs([prompts[0]], [responses[0]])[0])
  kl = eval_base.answer_token_kl(base_m, gated, prompts, responses)
  full = eval_base.answer_token_kl(base_m, after_m, prompts, responses)
  for i in (0, 2):
    assert kl[i].shape == full[i].shape and not kl[i].any()
  for i in (1, 3):
    np.testing.assert_allclose(kl[i], full[i], rtol=1e-5)
    assert (kl[i] > 0).all()
  with pytest.raises(ValueError, match="gate_fn"):
    eval_base.GatedModel("g", base_m, after_m, lambda ps: np.ones(len(ps) + 1, bool)).flags(["x"])


def test_gate_flags_by_threshold_and_round_trips(tiny, tmp_path):
  prompts = ["one", "two words", "and three words", "a longer prompt of five"]
  ids, mask = probe_lib.encode_prompts(tiny.tokenizer, prompts, 32)
  h = probe_lib.pooled_hidden_states(tiny.params, tiny.cfg, ids, mask)[1]  # [N, D]
  w = np.random.default_rng(0).standard_normal(h.shape[1]).astype(np.float32) / 8
  probe = {"w": w, "b": np.float32(0.1), "mu": h.mean(0), "sd": h.std(0) + 1e-6,
           "layer": np.int32(1)}
  g = probe_gate.Gate(probe, threshold=0.0, max_len=32, info={"recall": 0.9})
  probs = g.unsafe_probs(tiny.params, tiny.cfg, tiny.tokenizer, prompts, batch_size=2)
  want = 1 / (1 + np.exp(-(((h - probe["mu"]) / probe["sd"]) @ w + 0.1)))
  np.testing.assert_allclose(probs, want, rtol=1e-4)
  assert len(set(probs.round(4).tolist())) == 4
  mid = float(np.median(probs))
  g = probe_gate.Gate(probe, threshold=mid, max_len=32)
  np.testing.assert_array_equal(g.flags(tiny.params, tiny.cfg, tiny.tokenizer, prompts),
                                probs >= mid)
  path = str(tmp_path / probe_gate.GATE_FILE)
  probe_gate.save(path, g)
  back = probe_gate.load(path)
  assert (back.layer, back.threshold, back.max_len) == (1, mid, 32)
  np.testing.assert_allclose(back.unsafe_probs(tiny.params, tiny.cfg, tiny.tokenizer, prompts),
                             probs, rtol=1e-5)
  assert "hidden_states[layer]" in json.loads(pathlib.Path(path).read_text())["about"]


def _main(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "semsafe_jax.main", "--config=configs/tiny.py",
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                        check=False)


def test_main_job_generate_and_export_behind_the_gate(tmp_path):
  workdir = os.path.relpath(tmp_path / "w", REPO)
  # recall 0.5: a threshold inside the held-back prompts' range, so that on the random tiny
  # model some prompts fall on each side.
  gate_flags = ("--config.gate.use=True", "--config.gate.recall=0.5")
  out = _main(f"--workdir={workdir}", *gate_flags)
  assert out.returncode == 0, out.stderr[-4000:]
  w = tmp_path / "w"
  rep = json.loads((w / "report.json").read_text())
  assert set(rep["gated"]) == set(rep["after"])
  assert "gated" in rep["evals"]["refusal"] and "gated" in out.stdout
  g = probe_gate.load(str(w / probe_gate.GATE_FILE))
  assert rep["gate"]["layer"] == g.layer and g.info["recall"] == 0.5
  # Each gated answer is the adapted model's where the gate flags the prompt, else the base's.
  rows = lambda name: [json.loads(x) for x in (w / name).read_text().splitlines()]
  before, after, gated = rows("answers_before.jsonl"), rows("answers_after.jsonl"), rows(
      "answers_gated.jsonl")
  assert [r["prompt"] for r in gated] == [r["prompt"] for r in after]
  sides = {r["adapters"] for r in gated}
  assert sides == {True, False}, "the tiny run should gate some prompts each way"
  for b, a, r in zip(before, after, gated):
    assert r["completion"] == (a if r["adapters"] else b)["completion"]
  for split, share in rep["gate"]["flagged"].items():
    on = [r["adapters"] for r in gated if r["split"] == split]
    assert share == pytest.approx(sum(on) / len(on))

  # A changed gate setting reuses the trained run (resume-safe) and refits the gate.
  out = _main(f"--workdir={workdir}", "--config.gate.use=True", "--config.gate.recall=0.9")
  assert out.returncode == 0, out.stderr[-4000:]
  assert json.loads((w / "report.json").read_text())["train"]["steps_run"] == 0
  assert probe_gate.load(str(w / probe_gate.GATE_FILE)).info["recall"] == 0.9

  probe_gate.save(str(w / probe_gate.GATE_FILE), g)  # the recall 0.5 gate again
  prompts = [r["prompt"] for r in gated[:6]]
  (w / "p.txt").write_text("\n".join(prompts) + "\n")
  out = _main(f"--workdir={workdir}", "--config.mode=generate", "--config.gate.use=True",
              f"--config.generate.prompts_file={workdir}/p.txt",
              "--config.generate.max_new_tokens=4")
  assert out.returncode == 0, out.stderr[-4000:]
  gen = rows("generations.jsonl")
  assert [r["adapters"] for r in gen] == [r["adapters"] for r in gated[:6]]

  out = _main(f"--workdir={workdir}", "--config.mode=export", "--config.export.format=orbax")
  assert out.returncode == 0, out.stderr[-4000:]
  assert probe_gate.load(str(w / "export" / "orbax" / probe_gate.GATE_FILE)).layer == g.layer

  (w / probe_gate.GATE_FILE).unlink()
  out = _main(f"--workdir={workdir}", "--config.mode=generate", "--config.gate.use=True",
              "--config.generate.prompts=('hi',)")
  assert out.returncode != 0
  assert "gate.json does not exist" in out.stderr.strip().splitlines()[-1]
