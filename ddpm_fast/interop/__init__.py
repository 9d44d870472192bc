"""Reading and writing other libraries' model formats (diffusers)."""
