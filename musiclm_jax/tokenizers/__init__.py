"""Tokenizers: SoundStream (acoustic codes), w2v-BERT + k-means, MuLan, text."""
