"""The crop plan: which crops (boxes, flips, recipe draws) each image gets, seeded."""
