"""What tests (ours and a user's) need: generated tiny models and a fake engine. Nothing here downloads."""
