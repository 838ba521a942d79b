"""The base assets, built once per old model: dataset, old model, side-info model and the
stored gallery; their check and job."""
