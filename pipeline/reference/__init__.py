"""The reference task `pipeline.ingest` (JSON Lines or CSV events into `events`) and the
sample files the demo generates.

A user task like any other: it may import the worker side's public decorator and sources'
readers, never the store's modules (it writes through the checkpoint's output transaction).
"""
