"""lightning-influence: training-time influence logging for PyTorch Lightning."""
