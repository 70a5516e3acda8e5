"""Semantic-token evaluation (`musiclm eval semantic`): what the clusters capture.

On clips of a corpus whose scores are known (the `midi` feature), tokens at
25 Hz are compared with frame labels read from the score:

* `pitch_classes`: the set of sounding pitch classes (a 12-bit mask);
* `lowest_pitch_class`: the pitch class of the lowest sounding note;
* `top_pitch_class`: the pitch class of the highest sounding note (the tune,
  in most arrangements);
* `chord_root`: root of the major or minor triad that best covers the
  sounding pitch classes (the lowest note breaks ties);
* `drum_onset`: whether a drum note starts in the frame.

Silent frames (for drums: frames without an onset) form a label of their
own. For each label the report gives the normalised mutual information
(NMI, 0 .. 1) of tokens and labels, the NMI with the labels shuffled over
all frames (what chance and the finite sample give), and the adjusted
mutual information (AMI: 0 at chance, 1 for a perfect match), over all frames and
within clips (`within_clip_ami`: the mean over clips of the AMI of a clip's
own frames, over the clips whose label changes). A token that only names
the clip scores well over all frames, since a clip's key, chords and
register are its own, and 0 within clips; the report gives that AMI of the
clip's identity (`clip_identity`) beside the tokens'. Tokens that follow
the notes score well within clips too; a stage can only follow a tune (T_mel)
through tokens that do. With 1024
clusters and a few thousand frames most of a token set's NMI can be
finite-sample bias, and the bias grows with the clusters a token set
spreads the frames over: log-mel k-means on 20 clips scored 0.64 NMI on
pitch-class sets of which 0.37 came back with shuffled labels. AMI removes
the expected chance value and so is the measure to compare token sets by;
more test frames (`--num_clips`) shrink the bias of the NMI itself. The same is
reported for a baseline: k-means with as many clusters on log-mel frames
pooled to 25 Hz, fitted on the same training frames as the semantic
k-means. Also: cluster usage (perplexity of the token histogram, clusters
used) and token stability (fraction of frames whose token is unchanged)
under +/-3 dB gain and delays of 1-5 ms. Finally a layer sweep
(`layer_sweep`): the same k-means fitted on every w2v-BERT layer (the
subsampled input, each contrastive and MLM layer) with its NMI, to choose
the semantic layer (`fit_semantic_kmeans.mlm_layer` or
`W2vBertConfig.feature_layer` in gin).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pretty_midi
from sklearn.metrics import adjusted_mutual_info_score
from sklearn.metrics import normalized_mutual_info_score

from musiclm_jax.layers import spectral
from musiclm_jax.tasks import corpora
from musiclm_jax.tokenizers import semantic
from musiclm_jax.tokenizers import w2v_bert

LABELS = ("pitch_classes", "lowest_pitch_class", "top_pitch_class", "chord_root",
          "drum_onset")
GAINS_DB = (-3.0, 3.0)
SHIFTS_MS = (1, 2, 3, 4, 5)
NO_NOTE = -1
BASELINE_MELS = 80
_TRIADS = ((0, 4, 7), (0, 3, 7))  # major, minor

Tokenize = Callable[[np.ndarray], np.ndarray]  # 16 kHz [batch, samples] -> int [batch, frames]


@dataclasses.dataclass(frozen=True)
class LabelledClip:
  """A 16 kHz clip `wav [samples]` and its score's frame labels (`midi_frame_labels`)."""
  wav: np.ndarray
  labels: dict[str, np.ndarray]


def midi_frame_labels(midi: bytes, num_frames: int,
                      frame_rate: float = w2v_bert.FRAME_RATE) -> dict[str, np.ndarray]:
  """Per-frame labels of a standard MIDI file; frame i spans [i, i + 1) / frame_rate s.

  Returns:
    `{name: int32 [num_frames]}` for every name in `LABELS`; `NO_NOTE` (-1)
    where no pitched note sounds (`pitch_classes` is 0 there).
  """
  try:
    score = pretty_midi.PrettyMIDI(io.BytesIO(midi))
  except Exception as e:  # pretty_midi/mido raise many types on corrupt files
    raise ValueError(f"unreadable MIDI score ({len(midi)} bytes): {e}") from e
  chroma = np.zeros((num_frames, 12), bool)
  lowest = np.full(num_frames, 128)
  highest = np.full(num_frames, -1)
  drum_onset = np.zeros(num_frames, np.int32)
  for instrument in score.instruments:
    for note in instrument.notes:
      first = int(np.floor(note.start * frame_rate))
      if instrument.is_drum:
        if first < num_frames:
          drum_onset[first] = 1
        continue
      last = min(int(np.ceil(note.end * frame_rate)), num_frames)
      if first < last:
        chroma[first:last, note.pitch % 12] = True
        lowest[first:last] = np.minimum(lowest[first:last], note.pitch)
        highest[first:last] = np.maximum(highest[first:last], note.pitch)
  sounding = lowest < 128
  lowest_pc = np.where(sounding, lowest % 12, NO_NOTE)
  # Triad templates [roots * qualities, 12]; score = covered pitch classes,
  # + 0.5 when the template's root is the lowest note.
  templates = np.zeros((12 * len(_TRIADS), 12))
  for quality, intervals in enumerate(_TRIADS):
    for root in range(12):
      templates[quality * 12 + root, [(root + i) % 12 for i in intervals]] = 1
  roots = np.tile(np.arange(12), len(_TRIADS))
  scores = chroma @ templates.T + 0.5 * (roots[None] == lowest_pc[:, None])
  chord_root = np.where(sounding, roots[np.argmax(scores, axis=1)], NO_NOTE)
  return {"pitch_classes": (chroma * (1 << np.arange(12))).sum(axis=1).astype(np.int32),
          "lowest_pitch_class": lowest_pc.astype(np.int32),
          "top_pitch_class": np.where(sounding, highest % 12, NO_NOTE).astype(np.int32),
          "chord_root": chord_root.astype(np.int32),
          "drum_onset": drum_onset}


def read_labelled_clips(corpus_dir: str, split: str, num_clips: int
                        ) -> tuple[list[LabelledClip], int]:
  """Up to `num_clips` clips of a split that have a score, at 16 kHz, cut to their
  real duration (whole frames). Returns the clips and how many lacked a score."""
  clips, without_score = [], 0
  dataset = corpora.load(corpus_dir, split, sample_rate=w2v_bert.SAMPLE_RATE)
  for example in dataset.as_numpy_iterator():
    if len(clips) == num_clips:
      break
    if not example["midi"]:
      without_score += 1
      continue
    seconds = min(float(example["duration_s"]), len(example["audio"]) / w2v_bert.SAMPLE_RATE)
    frames = int(seconds * w2v_bert.FRAME_RATE)
    if frames < 1:
      continue
    clips.append(LabelledClip(example["audio"][:frames * w2v_bert.SAMPLES_PER_FRAME],
                              midi_frame_labels(example["midi"], frames)))
  if not clips:
    raise ValueError(f"the {split!r} split of {corpus_dir} has no clips with a MIDI score "
                     f"({without_score} without); the semantic evaluation needs scored "
                     "clips (gm_synth, music21_gm)")
  return clips, without_score


@jax.jit
def pooled_log_mel(wav: jax.Array) -> jax.Array:
  """The baseline's features: log-mel as w2v-BERT's input (80 bins, 10 ms hop) averaged
  over each 25 Hz frame. 16 kHz `[batch, samples]` -> `[batch, samples // 640, 80]`."""
  frames = w2v_bert.num_frames(wav.shape[-1])
  mel = spectral.log_mel_spectrogram(wav, w2v_bert.SAMPLE_RATE, w2v_bert.N_FFT,
                                     w2v_bert.HOP_LENGTH, BASELINE_MELS)
  mel = mel[:, :frames * w2v_bert.SUBSAMPLING]
  return mel.reshape(mel.shape[0], frames, w2v_bert.SUBSAMPLING, -1).mean(axis=2)


def fit_log_mel_kmeans(train_batches: Iterable[Mapping[str, np.ndarray]], num_clusters: int,
                       num_frames: int, frames_per_clip: int, seed: int
                       ) -> tuple[semantic.SemanticKMeans, dict[str, float]]:
  """The baseline's k-means; with the semantic fit's batches and sampling arguments
  it is fitted on the very frames (times) that the semantic k-means was."""
  frames = semantic.sample_frames(pooled_log_mel, train_batches, num_frames, frames_per_clip,
                                  seed)
  return semantic.fit_kmeans(jax.random.PRNGKey(seed), frames, num_clusters)


def cluster_usage(tokens: np.ndarray, num_clusters: int) -> dict[str, float]:
  """`{"perplexity", "used_clusters"}` of the token histogram."""
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=num_clusters)
  return {"perplexity": semantic.cluster_perplexity(counts),
          "used_clusters": int(np.sum(counts > 0))}


def label_nmi(tokens: np.ndarray, labels: Mapping[str, np.ndarray], seed: int = 0
              ) -> dict[str, dict[str, float]]:
  """Agreement of `tokens [n]` with each label `[n]`.

  Returns:
    `{"nmi": {label: NMI}, "nmi_shuffled_labels": {label: NMI with the label
    permuted}, "ami": {label: adjusted mutual information}}`.
  """
  rng = np.random.default_rng(seed)
  report = {"nmi": {}, "nmi_shuffled_labels": {}, "ami": {}}
  for name, values in labels.items():
    if np.shape(values) != np.shape(tokens):
      raise ValueError(f"label {name!r} has shape {np.shape(values)}; tokens have "
                       f"{np.shape(tokens)}")
    report["nmi"][name] = float(normalized_mutual_info_score(values, tokens))
    report["nmi_shuffled_labels"][name] = float(
        normalized_mutual_info_score(rng.permutation(values), tokens))
    report["ami"][name] = float(adjusted_mutual_info_score(values, tokens))
  return report


def within_clip_ami(tokens: Sequence[np.ndarray], labels: Sequence[Mapping[str, np.ndarray]]
                    ) -> dict[str, float | None]:
  """Mean over clips of the AMI of a clip's tokens `[frames_i]` with its labels.

  Only clips whose label takes two values or more count (a constant label has
  nothing to follow); None for a label that is constant in every clip.
  """
  if len(tokens) != len(labels):
    raise ValueError(f"{len(tokens)} clips of tokens for {len(labels)} clips of labels")
  report = {}
  for name in labels[0] if labels else ():
    scores = [adjusted_mutual_info_score(clip[name], clip_tokens)
              for clip_tokens, clip in zip(tokens, labels) if len(np.unique(clip[name])) > 1]
    report[name] = float(np.mean(scores)) if scores else None
  return report


def _delay(wav: np.ndarray, samples: int) -> np.ndarray:
  """`wav [batch, samples]` later by `samples`, same length (zeros in front)."""
  return np.pad(wav, ((0, 0), (samples, 0)))[:, :wav.shape[1]]


def token_stability(tokenize: Tokenize, wavs: Sequence[np.ndarray],
                    gains_db: Sequence[float] = GAINS_DB,
                    shifts_ms: Sequence[float] = SHIFTS_MS) -> dict[str, float]:
  """Fraction of frames whose token is unchanged (frame i against frame i).

  Returns:
    `{"gain_+3dB": ..., "delay_1ms": ..., "gain_mean": ..., "delay_mean": ...}`.
  """
  changes = {f"gain_{g:+g}dB": lambda w, g=g: w * np.float32(10 ** (g / 20)) for g in gains_db}
  changes.update({f"delay_{s:g}ms": lambda w, s=s: _delay(
      w, int(round(s * w2v_bert.SAMPLE_RATE / 1000))) for s in shifts_ms})
  same = {name: [] for name in changes}
  for wav in wavs:
    batch = np.asarray(wav, np.float32)[None]
    reference = np.asarray(tokenize(batch))
    for name, change in changes.items():
      same[name].append(np.asarray(tokenize(change(batch))) == reference)
  report = {name: float(np.mean(np.concatenate(v, axis=None))) for name, v in same.items()}
  for kind in ("gain", "delay"):
    values = [v for k, v in report.items() if k.startswith(kind)]
    if values:
      report[f"{kind}_mean"] = float(np.mean(values))
  return report


def evaluate_tokens(tokenize: Tokenize, num_clusters: int, clips: Sequence[LabelledClip],
                    seed: int = 0) -> dict[str, Any]:
  """Cluster usage, NMI with every label (and at chance), AMI over all frames and
  within clips, and stability of one tokenizer."""
  return {**_score_tokens([np.asarray(tokenize(clip.wav[None]))[0] for clip in clips], clips,
                          num_clusters, seed),
          "stability": token_stability(tokenize, [clip.wav for clip in clips])}


def _all_frames(clips: Sequence[LabelledClip]) -> dict[str, np.ndarray]:
  """Each label of every clip's frames, concatenated: `{name: [total_frames]}`."""
  return {name: np.concatenate([clip.labels[name] for clip in clips])
          for name in clips[0].labels}


def _score_tokens(tokens: Sequence[np.ndarray], clips: Sequence[LabelledClip],
                  num_clusters: int, seed: int) -> dict[str, Any]:
  """Usage and label agreement of each clip's tokens `[frames_i]`."""
  flat = np.concatenate(tokens)
  return {**cluster_usage(flat, num_clusters), **label_nmi(flat, _all_frames(clips), seed),
          "within_clip_ami": within_clip_ami(tokens, [clip.labels for clip in clips])}


def clip_identity(clips: Sequence[LabelledClip], seed: int = 0) -> dict[str, Any]:
  """`label_nmi` and `within_clip_ami` of a token that only names the clip (frame ->
  clip index): what clip-level information alone scores (0 within clips)."""
  index = [np.full(len(clip.labels[LABELS[0]]), i) for i, clip in enumerate(clips)]
  return {**label_nmi(np.concatenate(index), _all_frames(clips), seed),
          "within_clip_ami": within_clip_ami(index, [clip.labels for clip in clips])}


def layer_sweep(model: w2v_bert.W2vBertModel, params: Any,
                train_batches: Iterable[Mapping[str, np.ndarray]],
                clips: Sequence[LabelledClip], num_clusters: int, num_frames: int,
                frames_per_clip: int, seed: int = 0,
                dtype: str = semantic.FEATURE_DTYPE) -> dict[str, dict[str, Any]]:
  """Which layer to tokenise: k-means tokens of every w2v-BERT layer against the labels.

  For each of `model.layer_names()` (subsampled input, contrastive and MLM
  layers), k-means with `num_clusters` is fitted on the frames that
  `semantic.sample_frames` draws with these arguments (the same frame times
  as the semantic and baseline fits), and the clips' tokens are scored like
  `evaluate_tokens` (without the stability test).

  Returns:
    `{layer: {"perplexity", "used_clusters", "nmi", "nmi_shuffled_labels", "ami",
    "within_clip_ami"}}`.
  """
  names = model.layer_names()
  # [batch, frames, layers, d_model]
  layer_frames = jax.jit(lambda p, wav: jnp.moveaxis(model.layer_outputs(p, wav, dtype), 0, 2))

  def all_layers(wav: np.ndarray) -> jax.Array:  # [batch, frames, layers * d_model]
    h = layer_frames(params, wav)
    return h.reshape(*h.shape[:2], -1)

  frames = semantic.sample_frames(all_layers, train_batches, num_frames, frames_per_clip, seed)
  frames = frames.reshape(frames.shape[0], len(names), -1)
  clip_frames = [np.asarray(layer_frames(params, clip.wav[None]))[0] for clip in clips]
  report = {}
  for i, name in enumerate(names):
    fitted, _ = semantic.fit_kmeans(jax.random.PRNGKey(seed), frames[:, i], num_clusters)
    report[name] = _score_tokens([np.asarray(fitted.assign(f[:, i])) for f in clip_frames],
                                 clips, num_clusters, seed)
  return report


def evaluate_semantic(tokenizer: semantic.SemanticTokenizer,
                      train_batches: Iterable[Mapping[str, np.ndarray]],
                      clips: Sequence[LabelledClip], num_frames: int, frames_per_clip: int,
                      seed: int = 0) -> dict[str, Any]:
  """The semantic tokens against the log-mel k-means baseline on labelled clips.

  Args:
    tokenizer: the trained w2v-BERT with its fitted k-means.
    train_batches: 16 kHz `{"audio": [batch, samples]}` to fit the baseline on;
      give the semantic fit's batches, `num_frames`, `frames_per_clip` and
      `seed` to fit it on the same frames.
    clips: evaluation clips with frame labels.
  Returns:
    a JSON-able report: `semantic` and `log_mel_kmeans`, each with
    `perplexity`, `used_clusters`, `nmi`, `nmi_shuffled_labels`, `ami`,
    `within_clip_ami`, `stability`; `clip_identity` (`clip_identity`);
    `baseline_fit` (frames, inertia, ...); and `layers`, `layer_sweep` of the
    tokenizer's w2v-BERT on the same frames.
  """
  if not clips:
    raise ValueError("no clips to evaluate the semantic tokens on")
  baseline, fit_stats = fit_log_mel_kmeans(train_batches, tokenizer.num_clusters, num_frames,
                                           frames_per_clip, seed)
  assign_baseline = jax.jit(lambda wav: baseline.assign(pooled_log_mel(wav)))
  frames = sum(len(clip.labels[LABELS[0]]) for clip in clips)
  return {"clips": len(clips), "frames": frames,
          "seconds": frames / w2v_bert.FRAME_RATE, "frame_rate": w2v_bert.FRAME_RATE,
          "num_clusters": tokenizer.num_clusters,
          "label_classes": {name: int(len(np.unique(values)))
                            for name, values in _all_frames(clips).items()},
          "semantic": evaluate_tokens(tokenizer.semantic_tokens, tokenizer.num_clusters,
                                      clips, seed),
          "log_mel_kmeans": evaluate_tokens(assign_baseline, tokenizer.num_clusters, clips,
                                            seed),
          "clip_identity": clip_identity(clips, seed),
          "baseline_fit": fit_stats,
          "layers": layer_sweep(tokenizer.extractor.model, tokenizer.extractor.params,
                                train_batches, clips, tokenizer.num_clusters, num_frames,
                                frames_per_clip, seed, tokenizer.extractor.dtype)}


def _number(value: float | None, width: int) -> str:
  return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def format_report(report: Mapping[str, Any]) -> str:
  """A plain-text table of `evaluate_semantic`'s report."""
  methods = ("semantic", "log_mel_kmeans", "clip_identity")
  labels = list(report["label_classes"])
  lines = [f"{report['clips']} clips, {report['frames']} frames at "
           f"{report['frame_rate']:g} Hz, {report['num_clusters']} clusters "
           "(clip_identity: a token that only names the clip)",
           f"{'':<36}" + "".join(f"{name:>20}" for name in methods)]
  rows = [("perplexity", lambda r: r.get("perplexity")),
          ("used clusters", lambda r: r.get("used_clusters"))]
  rows += [(f"NMI {name}", lambda r, n=name: r["nmi"][n]) for name in labels]
  rows += [(f"AMI {name}", lambda r, n=name: r["ami"][n]) for name in labels]
  rows += [(f"AMI within clips {name}", lambda r, n=name: r["within_clip_ami"][n])
           for name in labels]
  rows += [("stable gain", lambda r: r.get("stability", {}).get("gain_mean")),
           ("stable delay", lambda r: r.get("stability", {}).get("delay_mean"))]
  for title, value in rows:
    lines.append(f"{title:<36}" + "".join(_number(value(report[m]), 20) for m in methods))
  if report.get("layers"):
    lines.append(f"AMI over all frames / within clips of each layer's k-means (tokens: MLM "
                 f"layer {report.get('mlm_layer', '?')})")
    lines.append(f"{'':<36}" + "".join(f"{name:>20}" for name in labels))
    for layer, result in report["layers"].items():
      lines.append(f"{layer:<36}" + "".join(
          f"{result['ami'][n]:>11.4f} /" + _number(result["within_clip_ami"][n], 7)
          for n in labels))
  return "\n".join(lines)
