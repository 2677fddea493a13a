"""The pre-training job: the AIMv2 LightningModule and data module, `pretrain(cfg)`, starting from an
earlier stage's weights (`model.init_from`) and the rehearsal of a pre-training config."""
