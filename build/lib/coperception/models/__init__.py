"""Detection models: pillar encoder -> BEV backbone -> (fusion) -> anchor head."""
