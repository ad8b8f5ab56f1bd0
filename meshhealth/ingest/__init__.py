"""Reading ingest: MQTT in, verification, de-duplication, batching, receipts out."""
