"""The seeds' traffic mix, shared by the Locust users and run.py's unloaded baseline."""

PROMPTS = {
    "typography": ['a poster that says "GRAND OPENING"', 'storefront banner that says "SUMMER SALE 50% OFF"',
                   'a coffee shop sign that reads: Fresh Bread', 'book cover titled "The Silent Harbor"'],
    "icon": ["flat minimal app icon of a rocket", "a simple line icon of a shopping cart",
             "favicon of a green leaf, flat"],
    "background": ["soft teal to purple gradient background for slides", "subtle paper texture backdrop",
                   "abstract blurred bokeh wallpaper in warm tones"],
    "photoreal": ["a photo of a golden retriever on a beach at sunset, 35mm",
                  "product shot of a white sneaker on a concrete floor, studio lighting"],
    "hero": ["hero image for our saas landing page, cinematic, above the fold",
             "campaign key visual for a summer product launch, dramatic light"],
}
# The seeds' mix: mostly cheap work (backgrounds, icons), some everyday images, a few hero shots and posters.
WEIGHTS = {"background": 30, "icon": 25, "photoreal": 20, "typography": 15, "hero": 10}
TIERS = {"free": 70, "pro": 25, "enterprise": 5}
