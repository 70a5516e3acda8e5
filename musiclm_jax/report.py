"""The quickstart's HTML report: listen, look and compare in one page.

`write_quickstart_report(paths, state)` writes `<workdir>/report/index.html`
and its media beside it in `report/media/` (a folder that can be copied or
served as it is):

  * per held-out prompt: the generated clip and the real clip of the prompt
    (audio players) with their mel spectrograms, and the measured tempo, key
    and nearest MuLan genre of both beside the ones the prompt asked for;
  * the generation measures for generated and real clips (`eval/generation.py`);
  * SoundStream reconstructions beside their originals, with spectrograms and
    the codec's quality table;
  * each model's training curves (from its run's `metrics.jsonl`);
  * the phases with their times and summaries.

The page checks its own media when it loads: every audio player and image
gets `data-status="ok"` or `"error"`, and a line at the top says how many
loaded, so a report moved without its media folder says so.
"""
from __future__ import annotations

import html
import json
import os
import shutil
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import librosa  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from musiclm_jax import audio  # pylint: disable=g-import-not-at-top,wrong-import-position

MEDIA_DIR = "media"
MODELS = ("soundstream", "w2v_bert", "mulan", "semantic", "coarse", "fine")
CURVE_KEYS = 4  # loss curves per model plot

# Marks each <audio> and <img> ok / error once it loads, and counts them.
MEDIA_CHECK = """
<script>
(function () {
  var media = Array.prototype.slice.call(document.querySelectorAll('audio, img'));
  var pending = media.length;
  function settle(el, status) {
    if (el.dataset.status) return;
    el.dataset.status = status;
    if (--pending === 0) {
      var bad = media.filter(function (m) { return m.dataset.status !== 'ok'; });
      var line = document.getElementById('media-status');
      line.dataset.status = bad.length ? 'error' : 'ok';
      line.textContent = bad.length
          ? bad.length + ' of ' + media.length + ' media files failed to load: ' +
            bad.map(function (m) { return m.getAttribute('src'); }).join(', ')
          : 'all ' + media.length + ' media files loaded';
    }
  }
  media.forEach(function (el) {
    if (el.tagName === 'IMG') {
      if (el.complete) settle(el, el.naturalWidth > 0 ? 'ok' : 'error');
      el.addEventListener('load', function () { settle(el, 'ok'); });
    } else {
      if (el.readyState >= 1) settle(el, 'ok');
      el.addEventListener('loadedmetadata', function () { settle(el, 'ok'); });
      el.preload = 'metadata';
      el.load();
    }
    el.addEventListener('error', function () { settle(el, 'error'); });
  });
  if (media.length === 0) document.getElementById('media-status').textContent = 'no media';
})();
</script>
"""

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.clip { border: 1px solid #ddd; padding: 0.8em; margin: 0.8em 0; }
.prompt { font-style: italic; }
.miss { color: #a33; }
#media-status[data-status=error] { color: #a33; font-weight: bold; }
img { max-width: 49%; }
img.curve { max-width: 100%; display: block; }
"""


def mel_image(wav: np.ndarray, path: str, title: str = "") -> None:
  """Writes the log-mel spectrogram of a 24 kHz `wav [samples]` as a PNG."""
  mel = librosa.feature.melspectrogram(y=np.asarray(wav, np.float32), sr=audio.SAMPLE_RATE,
                                       n_fft=1024, hop_length=256, n_mels=80)
  db = librosa.power_to_db(mel, ref=np.max, top_db=80.0)
  fig, ax = plt.subplots(figsize=(6, 2.2), dpi=80)
  ax.imshow(db, origin="lower", aspect="auto", cmap="magma",
            extent=(0, len(wav) / audio.SAMPLE_RATE, 0, 80))
  ax.set_xlabel("seconds")
  ax.set_ylabel("mel bin")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def curve_image(rows: Sequence[dict[str, float]], title: str, path: str) -> list[str]:
  """Plots a run's loss series, one panel each (their scales differ by orders of
  magnitude); returns the keys plotted."""
  keys = sorted({k for row in rows for k in row if "loss" in k and k != "step"},
                key=lambda k: (not k.endswith("/loss"), k))[:CURVE_KEYS]
  fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(2.6 * max(len(keys), 1), 2.4),
                           dpi=80, squeeze=False)
  for ax, key in zip(axes[0], keys):
    points = [(row["step"], row[key]) for row in rows if key in row and np.isfinite(row[key])]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, marker="." if len(points) < 20 else None)
    ax.set_title(key, fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return keys


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
  return f"<table><tr>{cells}</tr>{body}</table>"


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return html.escape(str(value))


def _audio(src: str) -> str:
  return f'<audio controls preload="metadata" src="{html.escape(src)}"></audio>'


def _img(src: str, alt: str, css_class: str = "") -> str:
  attribute = f' class="{css_class}"' if css_class else ""
  return f'<img{attribute} src="{html.escape(src)}" alt="{html.escape(alt)}">'


class _Media:
  """Copies or renders files into the report's media folder; returns their relative paths."""

  def __init__(self, report_dir: str):
    self.dir = os.path.join(report_dir, MEDIA_DIR)
    os.makedirs(self.dir, exist_ok=True)

  def copy(self, source: str, name: str) -> str:
    shutil.copyfile(source, os.path.join(self.dir, name))
    return f"{MEDIA_DIR}/{name}"

  def path(self, name: str) -> tuple[str, str]:
    return os.path.join(self.dir, name), f"{MEDIA_DIR}/{name}"


def _requested_key(attributes: dict[str, Any]) -> str:
  if attributes.get("key") and attributes.get("mode"):
    return f"{attributes['key']} {attributes['mode']}"
  return ""


def _prompt_sections(paths, media: _Media) -> str:
  with open(os.path.join(paths.eval, "generation.json"), encoding="utf-8") as f:
    report = json.load(f)
  parts = ["<h2>Generated clips for held-out prompts</h2>",
           "<p>Each prompt is a test-split caption the models never trained on; beside the "
           "generated clip is the real clip it describes. Measured: tempo by librosa's beat "
           "tracker, key by Krumhansl-Schmuckler on the mean chroma, genre as the nearest "
           "MuLan genre prompt.</p>"]
  rows = zip(report["prompts"], report["generated"]["per_clip"], report["reference"]["per_clip"])
  for i, (prompt, measured, real) in enumerate(rows):
    wav_path = os.path.join(paths.generated, f"prompt_{i:02d}.wav")
    real_path = os.path.join(paths.eval, "references", f"prompt_{i:02d}.wav")
    generated_src = media.copy(wav_path, f"prompt_{i:02d}.wav")
    real_src = media.copy(real_path, f"prompt_{i:02d}_real.wav")
    images = []
    for kind, path in (("generated", wav_path), ("real", real_path)):
      image_path, image_src = media.path(f"prompt_{i:02d}_{kind}_mel.png")
      mel_image(audio.read(path)[0][0], image_path, kind)  # as written, clipped or not
      images.append(_img(image_src, f"mel spectrogram of the {kind} clip"))
    attributes = prompt["attributes"]
    requested = {"tempo (bpm)": attributes.get("tempo_bpm", ""),
                 "key": _requested_key(attributes), "genre": attributes.get("genre", "")}
    table = _table(["", "requested", "generated", "real clip"], [
        ["tempo (bpm)", requested["tempo (bpm)"], measured["tempo_bpm"], real["tempo_bpm"]],
        ["key", requested["key"], measured["key"], real["key"]],
        ["genre (MuLan)", requested["genre"], measured["genre"], real["genre"]],
        ["MuLan cycle consistency", "", measured["cycle_consistency"],
         real["cycle_consistency"]]])
    parts.append(f'<div class="clip"><p class="prompt">{html.escape(prompt["prompt"])}</p>'
                 f"<p>generated: {_audio(generated_src)} &nbsp; real: {_audio(real_src)}</p>"
                 f"{''.join(images)}{table}</div>")
  keys = [k for k in report["generated"] if k != "per_clip"]
  parts.append("<h2>Generation measures</h2>")
  parts.append(f"<p>{report['num_clips']} prompts of {report['seconds']:.1f} s; Fréchet distance "
               f"of MuLan audio embeddings, generated to real: "
               f"{report['frechet_distance']:.4g}</p>")
  parts.append(_table(["measure", "generated", "real clips"],
                      [[k, report["generated"][k], report["reference"][k]] for k in keys]))
  return "\n".join(parts)


def _codec_section(paths, media: _Media) -> str:
  with open(os.path.join(paths.eval, "codec.json"), encoding="utf-8") as f:
    report = json.load(f)
  recon_dir = os.path.join(paths.eval, "reconstructions")
  parts = ["<h2>SoundStream reconstructions</h2>",
           "<p>Test clips through the codec (all levels) beside the originals.</p>"]
  names = sorted(n[:-len("_original.wav")] for n in os.listdir(recon_dir)
                 if n.endswith("_original.wav"))
  for name in names:
    cells = []
    for kind in ("original", "codec"):
      source = os.path.join(recon_dir, f"{name}_{kind}.wav")
      src = media.copy(source, f"{name}_{kind}.wav")
      image_path, image_src = media.path(f"{name}_{kind}_mel.png")
      mel_image(audio.read(source)[0][0], image_path, kind)
      cells.append(f"<td>{kind}<br>{_audio(src)}<br>{_img(image_src, f'{kind} mel')}</td>")
    parts.append(f"<table><tr>{''.join(cells)}</tr></table>")
  parts.append(_table(["levels", "bit/s", "mel distance", "SI-SNR (dB)"],
                      [[r["levels"], r["bitrate"], r["mel_distance"], r["si_snr"]]
                       for r in report["codec"]]))
  return "\n".join(parts)


def _stages_section(paths) -> str:
  """What each stage uses of its prefix (`eval/stages.json`; absent from runs
  whose evaluate phase finished before it was measured)."""
  from musiclm_jax.eval import stage as stage_eval  # pylint: disable=g-import-not-at-top
  path = os.path.join(paths.eval, "stages.json")
  if not os.path.isfile(path):
    return ""
  with open(path, encoding="utf-8") as f:
    reports = json.load(f)
  parts = ["<h2>What each stage uses of its prefix</h2>",
           "<p>Eval loss (nats per target token) on test windows with each window's own "
           "prefix, with a part of it padded, or with a part taken from a window of another "
           "clip; over the whole window and over its first frame (40 ms), which nothing "
           "earlier in the window predicts. An increase within about two standard errors "
           "of 0 means the stage ignores that part. Losses are over each token's legal ids, "
           "as the sampler draws; <i>outside legal</i> is the probability left on the "
           "others.</p>"]
  for name, report in reports.items():
    rows = [[variant, row["loss"], row["accuracy"],
             *(stage_eval.format_increase(row, k) for k in ("increase", "first_frame_increase")),
             row.get("outside_legal", "")]  # absent from reports before it was measured
            for variant, row in report["variants"].items()]
    parts.append(f"<h3>{html.escape(name)}: {report['windows']} windows, step "
                 f"{report['step']}</h3>")
    parts.append(_table(["prefix", "loss", "accuracy", "increase", "first-frame increase",
                         "outside legal"], rows))
  return "\n".join(parts)


def _semantic_section(paths) -> str:
  """Whether the semantic tokens follow the notes (`eval/semantic.json`; absent from
  runs whose evaluate phase finished before it was measured)."""
  path = os.path.join(paths.eval, "semantic.json")
  if not os.path.isfile(path):
    return ""
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  methods = ("semantic", "log_mel_kmeans", "clip_identity")
  ami = lambda value: "–" if value is None else f"{value:.3f}"  # None: a label never changes
  rows = [[label, *(f"{ami(report[m]['ami'][label])} / {ami(report[m]['within_clip_ami'][label])}"
                    for m in methods)]
          for label in report["label_classes"]]
  return "\n".join([
      "<h2>Do the semantic tokens follow the notes?</h2>",
      "<p>Adjusted mutual information of the tokens with labels read from the score of "
      f"{report['clips']} test clips, over all frames / within clips, beside k-means of "
      "log-mel and a token that only names the clip. A stage can only follow a tune "
      "through tokens that score well within clips.</p>",
      _table(["label", "semantic tokens", "log-mel k-means", "clip identity"], rows)])


def _curves_section(paths, media: _Media) -> str:
  from musiclm_jax.training import metrics  # pylint: disable=g-import-not-at-top
  parts = ["<h2>Training curves</h2>"]
  for model in MODELS:
    run = os.path.join(paths.workdir, "runs", model)
    if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
      continue
    image_path, image_src = media.path(f"curve_{model}.png")
    curve_image(metrics.read_jsonl_metrics(run), model, image_path)
    parts.append(_img(image_src, f"training curves of {model}", "curve"))
  return "\n".join(parts)


def _phases_section(state: dict[str, Any]) -> str:
  rows = []
  for phase, info in state["phases"].items():
    summary = {k: v for k, v in info.items() if k not in ("seconds", "finished")}
    rows.append([phase, info["seconds"], json.dumps(summary, default=str)[:300]])
  total = sum(info["seconds"] for info in state["phases"].values())
  return (f"<h2>Phases</h2><p>size {html.escape(state['size'])}; {total / 60:.1f} minutes "
          f"in all</p>" + _table(["phase", "seconds", "summary"], rows))


def write_quickstart_report(paths, state: dict[str, Any]) -> str:
  """Writes `<paths.report>/index.html` from a finished quickstart's files; returns its path."""
  shutil.rmtree(paths.report, ignore_errors=True)
  media = _Media(paths.report)
  body = "\n".join([
      "<h1>musiclm_jax quickstart</h1>",
      '<p id="media-status">checking media…</p>',
      _prompt_sections(paths, media), _codec_section(paths, media), _semantic_section(paths),
      _stages_section(paths),
      _curves_section(paths, media), _phases_section(state)])
  page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>musiclm_jax quickstart"
          f"</title><style>{STYLE}</style></head><body>{body}{MEDIA_CHECK}</body></html>")
  path = os.path.join(paths.report, "index.html")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(page)
  os.replace(path + ".tmp", path)
  return path
