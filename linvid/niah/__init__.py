"""Needle-in-a-video-haystack data (VNBench-style retrieval, ordering and counting): sample
generation, circular multiple-choice scoring and the `linvid niah` command."""
