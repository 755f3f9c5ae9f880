"""Site discovery: pure pattern matching on the exported graph."""
