"""The chat core: the values that cross layers, what an engine must offer, and the chat service.

Nothing here imports discord or torch, so the Discord client, the console, the model server and the
tests all build on it.
"""
