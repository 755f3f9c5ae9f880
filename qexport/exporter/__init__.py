"""Loading a source model, its family, the ONNX export and the text it is calibrated and evaluated on."""
