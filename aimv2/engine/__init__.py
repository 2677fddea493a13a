"""The shared training engine every job runs on: the Lightning Trainer factory and the run directory,
strategies and precision, gradient clipping, the optimizer and schedule, resume, preemption, atomic
checkpoint I/O, CSV metrics, progress, the data stream's position, launch checks and the rehearsal.
It knows no job: pre-training (aimv2.pretraining), compressor alignment (aimv2.compress) and probing
(aimv2.probe) build on it."""
