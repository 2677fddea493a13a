"""The objective ablation (AIMv2 paper): the same model pre-trained with AIMv2, captioning-only and
pixel-only objectives, plus its random initialization, each probed on held-out tasks over seeds."""
