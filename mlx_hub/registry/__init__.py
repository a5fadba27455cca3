"""Models on disk: the Hugging Face cache scan, hub.yaml editing (the only writer), conversion,
offloading, port teams and the LiteLLM export. Used by the CLI; the running hub never imports it."""
