"""What the four pipeline scripts share: the event codec, the settings and the result checker."""
