"""One clean display name per Objects365 category: what every prompt, query and record uses.

`data/objects365_categories.json` keeps the names as Objects365 v2 publishes them, and some of them are not what a
language, text-to-image, grounding or CLIP model should read: aliases (`Cabinet/shelf`), typos (`Moniter/TV`,
`Bakset`), taxonomy words (`Other Shoes`) and sports that stand for their ball (`Tennis`). The rule, applied by
hand to those names only (every other name displays as itself):

- an `a/b` alias becomes its first alternative, unless the pair names one object (`Picture/Frame` is a picture
  frame, `Cutting/chopping Board` a cutting board);
- spelling is corrected (`Moniter` -> monitor, `Dinning` -> dining, `Ballon` -> balloon, ...);
- "Other X" becomes X (the category is still the rest of X);
- a sport, game or vehicle class named by its activity becomes its object (`Tennis` -> tennis ball,
  `Formula 1` -> formula 1 car, `French` -> french horn).

Display names are unique, have no `/`, and keep the file's capitalisation style; `schemas.phrase` lower-cases
them for text. `category_combos` draws from the file's names and writes display names into its records, so
everything downstream (captions, FLUX, GroundingDINO, the VLM, CLIP, decimated instructions, MSIC) reads them.
"""
from __future__ import annotations

DISPLAY_NAMES = {
    "Other Shoes": "Shoes",
    "Cabinet/shelf": "Cabinet",
    "Handbag/Satchel": "Handbag",
    "Picture/Frame": "Picture Frame",
    "Bowl/Basin": "Bowl",
    "Moniter/TV": "Monitor",
    "Trash bin Can": "Trash Can",
    "Barrel/bucket": "Barrel",
    "Bakset": "Basket",
    "Pen/Pencil": "Pen",
    "Canned": "Canned Food",
    "Lifesaver": "Life Buoy",
    "Ballon": "Balloon",
    "Dinning Table": "Dining Table",
    "Blackboard/Whiteboard": "Blackboard",
    "Other Fish": "Fish",
    "Orange/Tangerine": "Orange",
    "Soccer": "Soccer Ball",
    "Skiboard": "Skis",
    "Head Phone": "Headphones",
    "Skating and Skiing shoes": "Skates",
    "Other Balls": "Ball",
    "Cutting/chopping Board": "Cutting Board",
    "Billards": "Billiard Ball",
    "Cigar/Cigarette": "Cigarette",
    "Extention Cord": "Extension Cord",
    "Tong": "Tongs",
    "Tennis": "Tennis Ball",
    "Washing Machine/Drying Machine": "Washing Machine",
    "Hotair ballon": "Hot Air Balloon",
    "Wallet/Purse": "Wallet",
    "Router/modem": "Router",
    "Hamimelon": "Hami Melon",
    "Mushroon": "Mushroom",
    "Tape Measur/ Ruler": "Tape Measure",
    "Campel": "Camel",
    "Formula 1": "Formula 1 Car",
    "Meat ball": "Meatball",
    "Buttefly": "Butterfly",
    "French": "French Horn",
    "Noddles": "Noodles",
    "Table Teniis paddle": "Table Tennis Paddle",
    "Cosmetics Brush/Eyeliner Pencil": "Cosmetics Brush",
    "Curling": "Curling Stone",
    "Table Tennis": "Table Tennis Ball",
}


def display_name(name: str) -> str:
    """The display name of an Objects365 category name (whitespace collapsed, as `load_categories` returns it)."""
    name = " ".join(name.split())
    return DISPLAY_NAMES.get(name, name)
