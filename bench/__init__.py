"""Speed and memory benchmark of the chat engine on a full-size random BlenderBot-400M (`python -m bench`)."""
