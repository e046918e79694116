"""Models: resolve what the user named, pull and convert, load with the right dtype, estimate memory."""
