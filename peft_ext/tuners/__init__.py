"""PEFT tuner types added by peft-ext."""
