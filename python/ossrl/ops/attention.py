"""Packed variable-length attention (sliding windows, GQA, sinks) and paged decoding."""
