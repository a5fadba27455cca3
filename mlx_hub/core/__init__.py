"""The core: one slot per model, admission, policies, ports and the hub that ties them.

It knows the engine only through ``engine.base`` and never imports the web layer;
the web layer hands it the app each model port serves.
"""
