"""sampserve: modular transformer toolkit, SAMP quantizer and inference server."""

__version__ = "0.1.0"
