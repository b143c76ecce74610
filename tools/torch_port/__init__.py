"""The PyTorch bridge: ``python -m tools.torch_port`` (to-orbax, to-torch, inspect, probe) and the PyTorch
ToyLM (``toylm_torch``) that reads what jaxlm writes. It imports jaxlm; jaxlm never imports it."""
