"""Test support for humpback (dev only, never in an image): see README.md next to this file."""
