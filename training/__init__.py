"""Training and ONNX export of SimpleRNN (tanh/relu), LSTM and GRU models."""
