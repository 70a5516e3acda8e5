"""Sampling from the stage decoders: KV-cached decoding, hierarchy, long form."""
