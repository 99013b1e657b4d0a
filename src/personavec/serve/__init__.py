"""``personavec serve``: an OpenAI-compatible chat server that steers, caps and reads persona vectors per request."""
