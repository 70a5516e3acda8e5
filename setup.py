"""musiclm_jax: MusicLM (text -> 24 kHz music) in JAX/Flax, laptop CPU to TPU/GPU pods."""
import setuptools

# Ranges resolve together on Python 3.11 (jax 0.10.2, flax 0.12.8, TF 2.21) and
# admit the jax 0.11 / flax 0.12 stack of Python 3.12 GPU machines.
CORE = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.0,<0.14",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.0,<0.13",
    "gin-config>=0.5.0,<0.6",
    "absl-py>=2.0",
    "numpy>=1.26",
    # the numpy stage reader (token_cache.py): tf.train.Example records, file
    # paths, TFRecord checksums (C; about 1000x a numpy CRC-32C)
    "protobuf>=4.25",
    "etils[epath]>=1.5",
    "google-crc32c>=1.5",
]
DATA = [
    "seqio>=0.0.19,<0.1",
    # SeqIO's cache job (`musiclm tokenize`); [tfrecord] brings crcmod for the TFRecord sink.
    "apache-beam[tfrecord]>=2.60,<3",
    "tensorflow-cpu>=2.18,<2.23",
    "tensorflow-datasets>=4.9.7,<5",
    "clu>=0.0.12,<0.1",
    "tensorboard>=2.18,<3",
    "librosa>=0.10.2,<0.12",
    "soundfile>=0.12.1",  # libsndfile >= 1.1: wav, flac, ogg, opus and mp3
    "soxr>=0.3.7",
    "pretty_midi>=0.2.10,<0.3",
    "music21>=9.1,<11",
    "scikit-learn>=1.3",  # normalised mutual information in the semantic-token evaluation
    "matplotlib>=3.8",  # the quickstart report's spectrograms and training curves
    # sentencepiece 0.2.3 is generated with protobuf 7, which apache-beam (the
    # SeqIO cache job) cannot use; 0.2.0 imports with either protobuf.
    "sentencepiece==0.2.0",
]
DEV = ["pytest>=8.0", "pytest-xdist>=3.5"]

setuptools.setup(
    name="musiclm_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["musiclm_jax", "musiclm_jax.*"]),
    install_requires=CORE,
    extras_require={"data": DATA, "dev": DATA + DEV},
    entry_points={"console_scripts": ["musiclm=musiclm_jax.main:run"]},
)
