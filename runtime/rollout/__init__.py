"""What produces and grades samples for online post-training: the generation engine
(`generate`), the loop detector (`loops`), judges and rewards."""
