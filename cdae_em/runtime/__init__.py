"""How a job runs: processes and GPUs (torchrun), progress and status.json, shared work arrays."""
