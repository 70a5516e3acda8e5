"""Input pipeline (the only TensorFlow code): TFDS corpora, and later the
SeqIO token and stage tasks. Models and train steps never import this."""
