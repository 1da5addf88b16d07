"""SAMP: self-adaptive mixed-precision quantization of our checkpoints into the model repository.
Built in the quantizer issue; it reads checkpoints written by ``training``."""
