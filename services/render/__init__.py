"""The llm <-> acoustic step: one message per batched step, whichever way it travels.

`values` holds what a step carries (the streams that join, the conditions of the streams that spoke, the
streams that end) and what comes back (next-step embeddings and audio), with their proto converters. `link`
is the one protocol both sides speak; `local` (the acoustic engine in the llm's process), `wire` (gRPC, tensors
in the messages) and `shared_memory` (gRPC for ids, tensors in GPU memory both processes map) are its
transports. The llm and the acoustic service import this package, never each other.
"""
