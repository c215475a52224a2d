"""Plain data types shared by every layer: envelopes and their parameters."""
