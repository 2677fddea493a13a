"""Scaling laws as a tool: fit them to runs this toolkit made and say what to train or deploy.

- vlm_*: downstream error against LLM parameters N and visual tokens V, `error = A N^-alpha V^-beta + D`
  ("Inference Optimal VLMs Need Only One Visual Token but Larger Models", arXiv 2411.03312), and the
  inference-optimal (N, V) under the prefill cost 2 N (Q + V) (`aimv2 scaling vlm`; the sweep that
  makes its input is `aimv2 compress sweep`).
- encoder_*: held-out pre-training loss against encoder parameters and training compute from a ladder
  of `aimv2 pretrain` runs (`aimv2 scaling encoder`).
"""
