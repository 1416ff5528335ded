"""Neural-network models: backbones and checkpoint loading, the factorized readout, the IT model."""
