"""`eval/stage.py`: what a stage uses of its prefix, on windows made in memory."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from musiclm_jax import stages
from musiclm_jax import vocab
from musiclm_jax.eval import stage as stage_eval
from musiclm_jax.models import DecoderOnlyModel
from musiclm_jax.models import prefix_lm_example
from musiclm_jax.training.optimizers import Optimizer
from musiclm_jax.training.train_state import TrainState

LAYOUT = vocab.TokenLayout(mulan_levels=12, mulan_codebook_size=4, semantic_codebook_size=16,
                           acoustic_levels=12, acoustic_codebook_size=64, melody_levels=2,
                           melody_codebook_size=8)
# Windows of one semantic frame and one melody window: with more frames, teacher
# forcing would let every frame after the first be read off the one before it.
SEMANTIC = stages.Stage(name="semantic", window_seconds=0.04, layout=LAYOUT,
                        melody_conditioning=True, melody_hop_seconds=0.04)


def windows_following_the_melody(rng, stage, count):
  """Windows whose semantic code is the first melody code: the target follows
  T_mel and does not depend on M."""
  prefixes, targets = [], []
  for _ in range(count):
    melody = rng.integers(0, LAYOUT.melody_codebook_size, (1, LAYOUT.melody_levels))
    clip = stages.ClipTokens(
        mulan=rng.integers(0, LAYOUT.mulan_codebook_size, LAYOUT.mulan_levels),
        semantic=melody[0, :1],
        acoustic=rng.integers(0, 64, (2 * stage.semantic_frames, 12)), melody=melody)
    prefix, target = stage.sequences(clip)
    prefixes.append(prefix)
    targets.append(target)
  return prefixes, targets


def test_partners_are_other_windows_of_the_same_lengths():
  prefixes = [np.zeros(n) for n in (5, 5, 5, 5, 3, 3, 7)]
  targets = [np.zeros(4)] * 7
  partner = stage_eval.partners(prefixes, targets)
  np.testing.assert_array_equal(partner, [2, 3, 0, 1, 5, 4, 6])  # the lone 7 keeps its own


def test_each_variant_changes_only_its_part_of_the_prefix():
  rng = np.random.default_rng(0)
  coarse = stages.Stage(name="coarse", window_seconds=0.4, layout=LAYOUT,
                        melody_conditioning=True, melody_hop_seconds=0.4)
  prefixes, targets = [], []
  for _ in range(6):
    melody = rng.integers(0, 8, (1, 2))
    clip = stages.ClipTokens(mulan=rng.integers(0, 4, 12), semantic=rng.integers(0, 16, 10),
                             acoustic=rng.integers(0, 64, (20, 12)), melody=melody)
    prefix, target = coarse.sequences(clip)
    prefixes.append(prefix)
    targets.append(target)
  prefixes[4] = prefixes[1].copy()  # window 1 borrows from 4: nothing changes
  variants = stage_eval.prefix_variants(coarse, prefixes, targets)
  assert list(variants) == ["own", "no_conditioning", "no_melody", "other_mulan",
                            "other_melody", "other_semantic"]
  parts = {"mulan": slice(0, 12), "melody": slice(12, 14), "semantic": slice(14, 24)}
  for name, part in parts.items():
    changed, unchanged = variants[f"other_{name}"]
    assert unchanged == pytest.approx(2 / 6)  # windows 1 and 4 swap identical prefixes
    for i, prefix in enumerate(changed):
      partner = prefixes[(i + 3) % 6]
      np.testing.assert_array_equal(prefix[part], partner[part])
      np.testing.assert_array_equal(np.delete(prefix, np.arange(24)[part]),
                                    np.delete(prefixes[i], np.arange(24)[part]))
  assert all(np.all(p[:14] == vocab.PAD_ID) for p in variants["no_conditioning"][0])
  assert all(np.all(p[12:14] == vocab.PAD_ID) and np.array_equal(p[:12], q[:12])
             for p, q in zip(variants["no_melody"][0], prefixes))
  fine = stages.Stage(name="fine", window_seconds=0.4, layout=LAYOUT)
  assert list(stage_eval.prefix_variants(fine, [np.ones(80)] * 2, [np.ones(160)] * 2)) == [
      "own", "other_coarse"]


@pytest.fixture(scope="module")
def trained():
  """A tiny semantic stage trained to copy the first melody code (80 steps)."""
  model = DecoderOnlyModel(tiny_config(vocab_size=LAYOUT.vocab_size))
  rng = np.random.default_rng(0)
  prefixes, targets = windows_following_the_melody(rng, SEMANTIC, 1)
  length = len(prefixes[0]) + len(targets[0])
  params = nn.unbox(model.init_params(jax.random.key(0), length))
  tx = optax.adam(3e-3)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key(0), model_state={})
  step = jax.jit(model.make_train_step(Optimizer(tx, optax.constant_schedule(3e-3))))
  untrained = params
  for _ in range(80):
    batch_prefixes, batch_targets = windows_following_the_melody(rng, SEMANTIC, 32)
    examples = [prefix_lm_example(p, t, length) for p, t in zip(batch_prefixes, batch_targets)]
    state, _ = step(state, {k: np.stack([e[k] for e in examples]) for k in examples[0]})
  return model, untrained, state.params


def legal_losses(model, params, stage, prefix, target, length):
  """Per target of one window: the cross entropy over its legal ids and the
  probability outside them, float64 `[targets]` each, from the full logits."""
  example = {k: v[None] for k, v in prefix_lm_example(prefix, target, length).items()}
  logits = np.asarray(model.logits(params, example)[0], np.float64)
  logits = logits[len(prefix):len(prefix) + len(target)]
  lo, hi = stage.target_ranges(len(target))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ids = np.arange(probs.shape[1])
  inside = np.where((ids >= lo[:, None]) & (ids < hi[:, None]), probs, 0.0)
  chosen = inside[np.arange(len(target)), target]
  return -np.log(chosen / inside.sum(-1)), 1.0 - inside.sum(-1)


def test_a_stage_that_follows_the_melody_loses_without_it_but_not_without_mulan(trained):
  model, untrained, params = trained
  prefixes, targets = windows_following_the_melody(np.random.default_rng(1), SEMANTIC, 40)
  report = stage_eval.evaluate_stage(model, params, SEMANTIC, prefixes, targets, batch_size=16)
  rows = report["variants"]
  assert report["windows"] == 40 and report["target_tokens"] == 40
  assert rows["own"]["accuracy"] > 0.95 and rows["own"]["loss"] < 0.2
  # Borrowed melodies: right only where the two melodies' codes happen to agree.
  same_code = np.mean([prefixes[i][12] == prefixes[(i + 20) % 40][12] for i in range(40)])
  assert rows["other_melody"]["accuracy"] == pytest.approx(same_code, abs=0.05)
  assert rows["other_melody"]["increase"] > 1.0
  assert rows["other_melody"]["increase"] > 10 * rows["other_melody"]["increase_stderr"]
  assert rows["no_melody"]["increase"] > 0.5 and rows["no_conditioning"]["increase"] > 0.5
  assert abs(rows["other_mulan"]["increase"]) < 0.05 * rows["other_melody"]["increase"]
  # The loss of `own` is over the legal ids: below the model's loss over the whole
  # vocabulary by what it puts outside them.
  length = len(prefixes[0]) + len(targets[0])
  legal = [legal_losses(model, params, SEMANTIC, p, t, length) for p, t in zip(prefixes, targets)]
  assert rows["own"]["loss"] == pytest.approx(np.mean([l for l, _ in legal]), rel=1e-4)
  assert rows["own"]["outside_legal"] == pytest.approx(np.mean([o for _, o in legal]), rel=1e-4)
  examples = [prefix_lm_example(p, t, length) for p, t in zip(prefixes, targets)]
  _, sums = model.loss_sums(params, {k: np.stack([e[k] for e in examples]) for k in examples[0]})
  assert rows["own"]["loss"] < float(sums["loss"] / sums["weight"])
  # One target per window: its first frame is all of it.
  assert report["first_frame_targets"] == 1
  assert rows["other_melody"]["first_frame_increase"] == pytest.approx(
      rows["other_melody"]["increase"], rel=1e-5)
  # Before training the melody matters little.
  before = stage_eval.evaluate_stage(model, untrained, SEMANTIC, prefixes, targets)["variants"]
  assert abs(before["other_melody"]["increase"]) < 0.05 * rows["other_melody"]["increase"]
  text = stage_eval.format_report(report)
  assert "other_melody" in text and "±" in text


def test_first_frame_losses_are_those_of_each_windows_first_semantic_frame(trained):
  model, untrained, _ = trained
  coarse = stages.Stage(name="coarse", window_seconds=0.2, layout=LAYOUT,
                        melody_conditioning=True, melody_hop_seconds=0.2)
  rng = np.random.default_rng(3)
  prefixes, targets = [], []
  for frames in (5, 5, 3):  # a short last window
    clip = stages.ClipTokens(mulan=rng.integers(0, 4, 12), semantic=rng.integers(0, 16, frames),
                             acoustic=rng.integers(0, 64, (2 * frames, 12)),
                             melody=rng.integers(0, 8, (1, 2)))
    prefix, target = coarse.sequences(clip)
    prefixes.append(prefix)
    targets.append(target)
  report = stage_eval.evaluate_stage(model, untrained, coarse, prefixes, targets, batch_size=2)
  assert report["first_frame_targets"] == 2 * 4  # two acoustic frames of the 4 coarse levels
  length = len(prefixes[0]) + len(targets[0])
  losses, outside = zip(*(legal_losses(model, untrained, coarse, p, t, length)
                           for p, t in zip(prefixes, targets)))
  own = report["variants"]["own"]
  assert own["loss"] == pytest.approx(np.concatenate(losses).mean(), rel=1e-5)
  assert own["first_frame_loss"] == pytest.approx(np.mean([l[:8] for l in losses]), rel=1e-5)
  # Untrained, the stage spreads its probability over all ids: mostly illegal ones.
  assert own["outside_legal"] == pytest.approx(np.concatenate(outside).mean(), rel=1e-5)
  assert own["outside_legal"] > 0.9


def test_too_few_windows_is_a_clear_error(trained):
  model, _, params = trained
  prefixes, targets = windows_following_the_melody(np.random.default_rng(2), SEMANTIC, 1)
  with pytest.raises(ValueError, match="at least two windows"):
    stage_eval.evaluate_stage(model, params, SEMANTIC, prefixes, targets)
