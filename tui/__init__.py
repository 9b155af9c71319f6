"""The Textual terminal chat (`yi-local chat`): app, screens, widgets and its .tcss, over the runtime's events."""
