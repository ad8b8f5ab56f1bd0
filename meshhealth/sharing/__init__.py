"""Patient-controlled keys: key chains, sealing to devices and grantees."""
