"""Model code shipped *inside* exported checkpoints (Hugging Face's custom-architecture
convention: a modeling file beside the weights, named in ``auto_map``, loaded with
``trust_remote_code=True``). Each file here is standalone: it imports torch and transformers
only, never hfedmoe, so the export loads where hfedmoe is not installed."""
