"""Moving Digits: the ablation `make demo` runs (data, image pre-training, config, driver)."""
