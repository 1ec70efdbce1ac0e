"""The monitor for training loops other than Lightning's (the Hugging Face ``Trainer``: :mod:`.hf`)."""
