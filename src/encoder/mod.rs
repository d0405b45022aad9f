//! The image encoder: preprocessing and the Candle EfficientNet-Lite network.
