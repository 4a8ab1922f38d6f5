"""An embedded demo corpus that looks like crawled web text, with planted problems and ground truth.

``generate_demo_corpus`` writes JSONL shards (one of them gzip-compressed) of ``{"id", "url", "text"}``
rows and nothing else: no row says what it is. Most rows are clean English prose built from a small
template grammar (topics, slot vocabularies, sentence templates, paragraphs), so a byte-level BPE
tokenizer sees real English statistics and a tiny language model can learn visible structure. Mixed in
are the things a curation pipeline has to deal with:

* HTML pages: prose wrapped in navigation, scripts, styles, cookie banners and footers;
* exact duplicates of earlier documents under a different id and URL;
* near duplicates: earlier documents with a few words inserted, removed or replaced;
* junk: error pages, keyword spam, symbol soup, cookie banners, lorem-ipsum-like non-words;
* malformed rows: invalid UTF-8, invalid JSON, a missing or non-string ``text``, one giant row;
* offensive documents (added to corpora of 100 rows or more, on top of the rows asked for): profane, insulting
  comments, alone or as one paragraph of an otherwise clean article, that pass every quality rule and only a
  toxicity classifier removes;
* borderline documents beside them: clean texts with words a naive filter trips on (the assassin bug,
  Scunthorpe, a battle's casualties, a whelping bitch), which must be kept.

What was planted (counts, and the ids of duplicates with their sources, junk, HTML pages, offensive
and borderline documents, and the positions of malformed rows) is returned and written to
``planted.json`` so benchmarks can measure precision and recall. Everything comes from one
``random.Random(seed)``: the same seed gives byte-identical files. Rows are streamed to the shards,
so memory stays bounded for large corpora.
"""

from __future__ import annotations

import gzip
import html
import json
import random
import re
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["MALFORMED_KINDS", "generate_demo_corpus", "shingles", "word_shingle_jaccard"]

MALFORMED_KINDS = ("bad_utf8", "invalid_json", "missing_text", "non_string_text", "too_large")

# Fractions of the rows of each planted kind; the rest is clean prose.
_FRACTIONS = {"html": 0.20, "exact_duplicates": 0.05, "near_duplicates": 0.05, "junk": 0.08, "malformed": 0.03}
_TOO_LARGE_BYTES = 1_050_000  # the giant row's text is larger than the 1,000,000-byte default limit
_RESERVOIR = 512  # earlier clean documents kept as candidate sources of duplicates

# Row kinds, stored one byte per row while the row plan is shuffled.
_CLEAN, _HTML, _EXACT, _NEAR, _JUNK = 0, 1, 2, 3, 4
_MALFORMED_CODE = {kind: 5 + i for i, kind in enumerate(MALFORMED_KINDS)}

# --------------------------------------------------------------------------------------------------
# Vocabulary. Each topic fills the slots of the sentence templates below:
#   focus  singular subjects that take "the"     adj     adjectives for them
#   does   verb phrases for a singular subject    people  plural agents
#   do     base-form verb phrases for people      when    time phrases
#   where  place phrases                          why     clauses giving a reason (no conjunction)
#   field  the subject area                       facts   standalone sentences
#   templates  extra topic-specific sentence templates (may use topic-only slots)
# --------------------------------------------------------------------------------------------------

_TOPICS: dict[str, dict[str, Any]] = {
    "gardening": {
        "domains": ["greenrow-gardens.net", "allotment-diary.org", "thekitchengardener.co.uk"],
        "field": ["the garden", "home gardening", "vegetable growing"],
        "focus": ["tomato plant", "rose bush", "compost heap", "herb garden", "raised bed", "apple tree",
                  "vegetable patch", "lawn", "greenhouse", "potato crop", "lavender hedge", "strawberry bed",
                  "runner bean", "wildflower meadow", "pear tree", "pumpkin patch"],
        "adj": ["hardy", "fragrant", "productive", "delicate", "forgiving", "rewarding", "demanding", "colourful",
                "reliable", "generous", "thirsty", "versatile"],
        "does": ["needs plenty of light to grow well", "benefits from a thick layer of mulch",
                 "responds well to regular feeding", "rewards a little patience",
                 "depends on healthy, well-drained soil", "can suffer badly in a late frost",
                 "attracts bees and other useful insects", "does best in a sheltered spot",
                 "struggles when its roots sit in cold water", "recovers quickly after careful pruning",
                 "grows surprisingly fast once the weather warms up", "needs far less water than most people think",
                 "is easy to neglect during a busy summer", "looks its best in the middle of June"],
        "people": ["gardeners", "beginners", "experienced growers", "allotment holders", "home gardeners",
                   "professional growers", "keen amateurs"],
        "do": ["water the beds early in the morning", "add garden compost to the soil every autumn",
               "sow seeds in small pots on a windowsill", "prune back the old growth",
               "rotate crops from one year to the next", "check the leaves for pests every few days",
               "keep a simple notebook of what was planted and when", "leave a corner of the garden wild",
               "collect rainwater in a large barrel", "label every row of seedlings"],
        "when": ["in early spring", "after the last frost", "during the summer months", "in late autumn",
                 "at the end of the season", "after a long dry spell", "in the first warm weeks of the year",
                 "on a mild winter afternoon"],
        "where": ["in a sunny corner", "against a south-facing wall", "in heavy clay soil", "in a small urban garden",
                  "on a windy balcony", "in a cold greenhouse", "in a shady border"],
        "why": ["healthy soil holds both water and nutrients", "young roots are easily damaged",
                "many pests spread quickly in warm weather", "plants grown slowly are often stronger",
                "mulch keeps the soil cool and moist", "a crowded bed invites disease"],
        "facts": ["A layer of well-rotted compost improves almost any kind of soil.",
                  "Most vegetables need at least six hours of sunlight a day.",
                  "Watering deeply once a week is usually better than a light sprinkle every evening.",
                  "Companion planting, such as growing marigolds beside tomatoes, is an old and popular idea.",
                  "Rainwater is softer than tap water and many plants prefer it.",
                  "Earthworms are a good sign that the soil is in good health."],
        "templates": ["Growing the {focus} {where} is a popular choice, because {why}.",
                      "If you grow the {focus} {where}, it is wise to {do}.",
                      "Many {people} {do} {when}, and the {focus} is no exception."],
    },
    "cooking": {
        "domains": ["slowkitchen.net", "weeknight-suppers.com", "thecopperpot.co.uk"],
        "field": ["the kitchen", "home cooking", "everyday cooking"],
        "focus": ["sourdough loaf", "tomato sauce", "risotto", "omelette", "roast chicken", "vegetable soup",
                  "cast iron pan", "chocolate cake", "curry", "chicken stock", "pancake batter", "crème brûlée",
                  "lemon tart", "bread dough", "pasta sauce", "apple pie"],
        "adj": ["simple", "comforting", "versatile", "rich", "delicate", "forgiving", "satisfying", "traditional",
                "fragrant", "hearty", "elegant", "humble"],
        "does": ["tastes better with fresh ingredients", "depends on good timing more than on expensive equipment",
                 "improves when it rests for a few minutes", "needs a generous pinch of salt",
                 "can be prepared a day in advance", "benefits from slow, gentle heat",
                 "rewards careful attention to detail", "freezes well for up to three months",
                 "is easier to make than most people expect", "changes completely with a squeeze of lemon",
                 "goes well with a simple green salad", "fills the whole house with a wonderful smell"],
        "people": ["home cooks", "chefs", "bakers", "beginners", "food writers", "professional cooks",
                   "grandparents"],
        "do": ["taste the food while it cooks", "prepare all the ingredients before lighting the stove",
               "use a sharp knife and a heavy pan", "toast the spices in a dry pan",
               "season the dish a little at a time", "let the dough rest overnight",
               "keep a jar of good stock in the freezer", "follow the recipe exactly the first time",
               "buy vegetables that are in season", "warm the plates before serving"],
        "when": ["on a cold winter evening", "for a weekend lunch", "before the guests arrive",
                 "at the end of a long day", "during the holidays", "on a busy weeknight", "early on a Sunday"],
        "where": ["in a small kitchen", "in a wood-fired oven", "on a camping stove", "in a busy restaurant",
                  "at a family gathering", "in a little French café"],
        "why": ["heat brings out the natural sweetness of vegetables", "salt sharpens every other flavour",
                "a rested dough is much easier to shape", "fresh herbs lose their aroma quickly",
                "the flavours need time to blend", "a hot pan seals in the juices"],
        "facts": ["Onions cooked slowly in butter become sweet and golden.",
                  "A good stock is the foundation of many classic sauces.",
                  "Bread rises because yeast produces carbon dioxide as it feeds on sugar.",
                  "Resting meat after roasting keeps it tender and juicy.",
                  "Many cooks say that a sharp knife is safer than a blunt one.",
                  "A classic crème brûlée needs only cream, eggs, sugar and vanilla."],
        "templates": ["To make a good {focus}, {people} usually {do}.",
                      "A {focus} made {where} {does}.",
                      "Serve the {focus} {when}, and it {does}."],
    },
    "astronomy": {
        "domains": ["darkskies-journal.org", "backyard-observer.net", "thenightsky.co.uk"],
        "field": ["modern astronomy", "amateur astronomy", "the study of the night sky"],
        "focus": ["Moon", "Andromeda galaxy", "red giant", "planet Jupiter", "comet", "solar eclipse", "Milky Way",
                  "neutron star", "meteor shower", "ring system of Saturn", "telescope", "Orion Nebula",
                  "black hole", "planet Mars", "pole star", "northern lights"],
        "adj": ["distant", "bright", "faint", "spectacular", "mysterious", "ancient", "massive", "beautiful",
                "elusive", "dramatic"],
        "does": ["can be seen with the naked eye on a clear night", "looks very different through a small telescope",
                 "has fascinated observers for thousands of years", "reveals a great deal about how stars are born",
                 "is best observed far away from city lights", "moves slowly across the sky from night to night",
                 "appears brightest a few hours after sunset", "still holds many secrets for modern science",
                 "is easier to find than most beginners expect", "changes its appearance over the course of a year",
                 "was described in detail by early observers"],
        "people": ["astronomers", "amateur observers", "stargazers", "physicists", "students",
                   "backyard astronomers"],
        "do": ["let their eyes adapt to the dark for twenty minutes", "use a red torch to read star charts",
               "photograph the night sky with long exposures", "record every observation in a logbook",
               "travel far from city lights", "measure the brightness of distant stars",
               "follow the planets across the sky", "check the weather forecast before setting up"],
        "when": ["on a clear winter night", "just before dawn", "in the weeks around the new moon",
                 "during a total eclipse", "late in the summer", "in the early evening", "in the middle of August"],
        "where": ["in the southern hemisphere", "high in the eastern sky", "from a dark rural site",
                  "close to the horizon", "near the constellation of Orion", "from the top of a mountain"],
        "why": ["light from distant objects takes years to reach us", "the atmosphere blurs fine detail",
                "the night sky changes with the seasons", "city lights wash out faint stars",
                "gravity shapes everything in the universe"],
        "facts": ["Light from the Sun takes about eight minutes to reach the Earth.",
                  "The Moon always shows the same face to the Earth.",
                  "A light year is the distance that light travels in one year.",
                  "Jupiter is the largest planet in the solar system.",
                  "Most of the stars visible to the naked eye lie within a few hundred light years of the Sun."],
        "templates": ["Seen {where}, the {focus} {does}.",
                      "{people} who {do} will find the {focus} {when}.",
                      "Through binoculars the {focus} is {adv} {adj}."],
    },
    "history": {
        "domains": ["pastandpresent-history.org", "the-long-view.net", "oldroads-history.co.uk"],
        "field": ["European history", "economic history", "the history of trade"],
        "focus": ["printing press", "Silk Road", "Roman army", "medieval monastery", "Hanseatic League",
                  "Industrial Revolution", "steam engine", "Byzantine Empire", "Renaissance", "Viking longship",
                  "Library of Alexandria", "railway age", "feudal system", "spice trade", "guild system"],
        "adj": ["influential", "turbulent", "remarkable", "complex", "enduring", "ambitious", "powerful",
                "controversial", "fascinating", "decisive"],
        "does": ["changed the way ideas spread across Europe", "left a lasting mark on law and language",
                 "depended on a network of merchants and scribes", "shaped the growth of towns and cities",
                 "grew out of centuries of slow change", "connected distant regions through trade",
                 "relied on careful record keeping", "transformed daily life for ordinary people",
                 "played a central role in the politics of its time", "declined slowly rather than overnight"],
        "people": ["historians", "archaeologists", "scholars", "students of the period", "museum curators",
                   "local historians"],
        "do": ["study letters, tax records and court documents", "compare written sources with archaeological finds",
               "read the surviving accounts with great care", "visit the old trade routes",
               "question the stories told by the winners", "reconstruct the lives of ordinary people"],
        "when": ["in the sixteenth century", "during the late Middle Ages", "in the years after 1850",
                 "around the year 1200", "in the early modern period", "over the following century",
                 "by the end of the eighteenth century"],
        "where": ["in northern Italy", "along the coasts of the Baltic Sea", "across the Mediterranean world",
                  "in the market towns of England", "throughout central Asia", "in the growing cities of the north"],
        "why": ["written records from the period are scarce", "trade brought new ideas as well as goods",
                "rulers needed money to pay their armies", "literacy was slowly spreading",
                "many sources were lost in fires and wars"],
        "source": ["letters and diaries", "tax records", "the accounts of travellers", "archaeological excavations",
                   "church registers", "surviving maps and charters"],
        "facts": ["Paper reached Europe from China by way of the Islamic world.",
                  "Medieval merchants often kept their accounts in several currencies at once.",
                  "The first public railways carried coal long before they carried passengers.",
                  "Many medieval towns grew up around a castle, a bridge or a market."],
        "templates": ["Much of what we know about the {focus} comes from {source}.",
                      "The history of the {focus} begins {when}.",
                      "{when}, the {focus} {does}.",
                      "Historians still debate how the {focus} {does} {where}."],
    },
    "travel": {
        "domains": ["slowtravel-notes.com", "thewanderingmap.net", "railandroad-journal.co.uk"],
        "field": ["travel writing", "independent travel", "slow travel"],
        "focus": ["night train", "old town", "coastal path", "mountain village", "youth hostel", "city break",
                  "road trip", "island ferry", "walking tour", "street market", "national park", "harbour town",
                  "cycling holiday", "river cruise"],
        "adj": ["charming", "peaceful", "crowded", "affordable", "scenic", "memorable", "relaxing", "lively",
                "remote", "unforgettable"],
        "does": ["is best explored slowly and on foot", "offers a very different view of the country",
                 "gets busy during the school holidays", "can be surprisingly cheap outside the main season",
                 "rewards travellers who plan a little in advance", "leaves a lasting impression on most visitors",
                 "works well for families as well as solo travellers", "feels very different early in the morning",
                 "is a good way to meet people from all over the world"],
        "people": ["travellers", "backpackers", "tourists", "families", "local guides", "travel writers",
                   "solo travellers"],
        "do": ["book the train tickets a few weeks ahead", "pack light and carry a paper map",
               "learn a few words of the local language", "eat where the locals eat",
               "walk the narrow streets early in the morning", "avoid the busiest weeks of the summer",
               "leave a free day at the end of the trip", "carry a little cash for small shops"],
        "when": ["in late spring", "outside the peak season", "during the winter months", "on a long weekend",
                 "in the first week of September", "at sunrise"],
        "where": ["in Lisbon", "on the Amalfi coast", "in the Scottish Highlands", "in the hills above Kyoto",
                  "in the old quarter of Zürich", "along the Danube", "in the cafés of São Paulo",
                  "on the islands of Greece", "in the mountains of Norway"],
        "why": ["prices fall sharply outside the main season", "the best views are often away from the main roads",
                "local food says a great deal about a place", "slow travel leaves room for surprises",
                "the weather can change quickly in the mountains"],
        "facts": ["Many European railways offer discounted passes for young travellers.",
                  "Carrying a reusable water bottle saves both money and plastic.",
                  "Travel insurance is worth buying before any long trip.",
                  "A good guidebook is still useful, even in the age of smartphones."],
        "templates": ["Our favourite {focus} was {where}, and we would go back tomorrow.",
                      "If you only have a few days, {do} and let the {focus} surprise you.",
                      "The {focus} {where} {does}."],
    },
    "programming": {
        "domains": ["thecodingnotebook.dev", "plain-software.net", "bitsandbytes-blog.com"],
        "field": ["software engineering", "computer science", "everyday programming"],
        "focus": ["compiler", "hash table", "garbage collector", "unit test", "version control system",
                  "database index", "web server", "regular expression", "linked list", "type system",
                  "command line", "code review", "sorting algorithm", "cache", "binary search"],
        "adj": ["efficient", "elegant", "reliable", "fast", "flexible", "simple", "powerful", "predictable",
                "readable", "robust"],
        "does": ["makes large programs much easier to maintain", "trades a little memory for a great deal of speed",
                 "catches many mistakes before the code is released", "needs careful design to scale well",
                 "hides a surprising amount of complexity", "behaves predictably when the input is small",
                 "becomes slow if it is used carelessly", "saves developers hours of tedious work",
                 "is easier to understand with a simple diagram", "works best when it is kept small"],
        "people": ["programmers", "software engineers", "developers", "students", "system administrators",
                   "open source contributors"],
        "do": ["write small functions with clear names", "run the tests before every commit",
               "read the error message carefully", "measure performance before optimising",
               "keep the code simple and readable", "review each other's changes",
               "document the unusual parts of the design", "delete code that is no longer used"],
        "when": ["early in a project", "before a major release", "during a code review", "as the program grows",
                 "at the start of each sprint", "after a difficult bug has been fixed"],
        "where": ["in a large codebase", "on a small embedded device", "in a busy web application",
                  "on a shared server", "in a data pipeline"],
        "why": ["most bugs hide in the code nobody reads", "simple code is easier to change",
                "memory access is often slower than computation", "a failing test points straight to the problem",
                "users notice slow responses at once"],
        "facts": ["A hash table finds an item in roughly constant time on average.",
                  "Version control lets a team work on the same code without losing changes.",
                  "Most programs spend most of their time in a small part of the code.",
                  "Regular expressions are powerful but can be hard to read.",
                  "Binary search only works on data that is already sorted."],
        "templates": ["In our experience, the {focus} {does} {where}.",
                      "A well designed {focus} {does}.",
                      "Before you reach for the {focus}, {do}."],
    },
    "sport": {
        "domains": ["thesportsdesk.net", "fulltime-analysis.com", "clubrunner-weekly.co.uk"],
        "field": ["modern sport", "amateur sport", "competitive sport"],
        "focus": ["marathon", "penalty kick", "offside rule", "tennis serve", "relay race", "rowing crew",
                  "cycling team", "cricket season", "football club", "swimming stroke", "training plan",
                  "world cup", "rugby scrum", "high jump"],
        "adj": ["demanding", "thrilling", "tactical", "exhausting", "competitive", "popular", "dramatic",
                "technical", "fast"],
        "does": ["rewards consistent training over many months", "depends on timing as much as strength",
                 "has changed a great deal over the last fifty years", "draws huge crowds every season",
                 "tests both the body and the mind", "often decides the outcome of a close match",
                 "looks simple but takes years to master", "depends on trust between team members"],
        "people": ["athletes", "coaches", "fans", "referees", "runners", "young players", "club members"],
        "do": ["warm up carefully before every session", "study recordings of earlier matches",
               "rest properly between hard workouts", "practise the basic skills every day",
               "set realistic goals for the season", "listen to the advice of experienced coaches"],
        "when": ["at the start of the season", "in the final minutes of a match", "during the winter break",
                 "on race day", "in the weeks before a big tournament", "after a long injury"],
        "where": ["in front of a home crowd", "on a wet and heavy pitch", "at high altitude", "in an indoor arena",
                  "on a quiet country road"],
        "why": ["fatigue affects decisions as much as muscles", "small gains add up over a season",
                "confidence grows with every good performance", "the rules reward careful positioning"],
        "facts": ["The modern marathon distance is a little over forty-two kilometres.",
                  "Most injuries in amateur sport come from doing too much too soon.",
                  "A good warm up raises the body temperature and loosens the muscles."],
        "templates": ["{when}, the {focus} {does}.",
                      "Ask any of the {people} and they will tell you that the {focus} {does}.",
                      "Winning {where} is never easy, because {why}."],
    },
    "music": {
        "domains": ["thelisteningroom.org", "notes-and-chords.net", "folkandfiddle.co.uk"],
        "field": ["classical and popular music", "music history", "music education"],
        "focus": ["violin", "string quartet", "blues scale", "symphony orchestra", "piano sonata", "jazz standard",
                  "folk song", "electric guitar", "church choir", "drum kit", "opera house", "music festival",
                  "brass band", "cello"],
        "adj": ["expressive", "haunting", "lively", "melancholy", "complex", "joyful", "delicate", "powerful",
                "intimate", "timeless"],
        "does": ["has a long and colourful history", "sounds very different in a small room",
                 "rewards careful and regular practice", "depends on a good sense of rhythm",
                 "brings people together across generations", "can express a remarkable range of feelings",
                 "has influenced countless later musicians",
                 "changes character completely in the hands of a great player"],
        "people": ["musicians", "composers", "listeners", "music teachers", "young students", "conductors",
                   "critics"],
        "do": ["practise scales slowly every morning", "listen closely to older recordings",
               "play together in small groups", "learn to read music early",
               "record their rehearsals and listen back", "tune their instruments with care"],
        "when": ["in the late nineteenth century", "during the summer festival season", "on a quiet Sunday afternoon",
                 "in the early years of recorded sound", "before an important concert", "late at night"],
        "where": ["in a small jazz club", "in a cathedral with a long echo", "at an outdoor festival",
                  "in a crowded concert hall", "in a village pub"],
        "why": ["rhythm matters as much as melody", "every room changes the sound",
                "good technique frees the imagination", "music is learned best by ear"],
        "facts": ["A string quartet has two violins, a viola and a cello.",
                  "The piano was once called the pianoforte because it could play both soft and loud.",
                  "Many folk songs were passed on by ear for generations before anyone wrote them down."],
        "templates": ["Heard {where}, the {focus} is {adv} {adj}.",
                      "The {focus} first became popular {when}.",
                      "Good {people} {do}, and the {focus} shows why."],
    },
    "wildlife": {
        "domains": ["wildside-notes.org", "hedgerow-journal.net", "thefieldguide.co.uk"],
        "field": ["natural history", "wildlife conservation", "the study of animals"],
        "focus": ["red fox", "barn owl", "honey bee", "humpback whale", "coral reef", "hedgehog", "grey heron",
                  "monarch butterfly", "beaver", "mountain gorilla", "salmon run", "badger", "swallow"],
        "adj": ["shy", "remarkable", "endangered", "adaptable", "graceful", "clever", "elusive", "familiar",
                "fragile", "social"],
        "does": ["plays an important part in the local ecosystem", "is most active around dawn and dusk",
                 "depends on a healthy and varied habitat", "has adapted well to life near people",
                 "travels great distances every year", "is easily disturbed by noise and light",
                 "feeds on a surprisingly wide range of food", "has become much rarer over the last century"],
        "people": ["biologists", "naturalists", "wildlife photographers", "conservation volunteers",
                   "birdwatchers", "park rangers"],
        "do": ["watch quietly from a distance", "keep detailed records of every sighting",
               "plant native flowers and hedges", "leave small gaps in garden fences",
               "follow the marked paths in nature reserves", "report unusual sightings to local groups"],
        "when": ["in the breeding season", "during the long winter months", "at first light", "in the middle of summer",
                 "during the autumn migration", "after heavy rain"],
        "where": ["in ancient woodland", "along quiet river banks", "in shallow coastal waters",
                  "on the edge of farmland", "in city parks and gardens", "high in the mountains"],
        "why": ["habitat loss is the greatest threat to wildlife", "many species rely on a single food source",
                "even small gardens can support a surprising number of insects",
                "healthy rivers support life far beyond their banks"],
        "facts": ["Barn owls can hunt in almost complete darkness by sound alone.",
                  "A single honey bee colony can contain tens of thousands of workers.",
                  "Beavers change whole landscapes by building dams across streams."],
        "templates": ["Watching the {focus} {where} is a real privilege.",
                      "{when}, the {focus} {does}.",
                      "Local {people} {do} to help the {focus}."],
    },
    "architecture": {
        "domains": ["stoneandtimber.org", "the-city-walker.net", "buildingstories.co.uk"],
        "field": ["architecture", "the history of building", "urban design"],
        "focus": ["Gothic cathedral", "flying buttress", "timber frame", "terraced house", "suspension bridge",
                  "brick warehouse", "town hall", "stone arch", "glass facade", "country house", "lighthouse",
                  "covered market"],
        "adj": ["elegant", "imposing", "practical", "graceful", "ambitious", "sturdy", "ornate", "modest",
                "innovative", "handsome"],
        "does": ["reflects the wealth and ambitions of its builders", "depends on careful engineering as much as style",
                 "has survived centuries of wind and weather", "lets a surprising amount of light into the interior",
                 "was built with local stone and timber", "shaped the character of the surrounding streets",
                 "needs regular care to stay in good condition",
                 "combines beauty with a clear practical purpose"],
        "people": ["architects", "engineers", "builders", "historians of architecture", "visitors",
                   "conservation experts"],
        "do": ["study old drawings and building records", "use local materials whenever possible",
               "walk around a building before judging it", "look closely at the details of doors and windows",
               "repair old structures with traditional methods"],
        "when": ["in the twelfth century", "during the Victorian era", "after the great fire",
                 "in the years between the wars", "in the late nineteenth century"],
        "where": ["in the centre of the old town", "on the banks of the river", "at the edge of the market square",
                  "in a narrow medieval street", "on an exposed coastal headland"],
        "why": ["stone is strong in compression but weak in tension", "good proportions please the eye",
                "builders had to work with the materials at hand", "every generation adds something new to a city"],
        "facts": ["The pointed arch allowed medieval builders to raise taller and lighter walls.",
                  "Many old houses were built with timber from the nearest forest.",
                  "Lime mortar lets old walls breathe and move a little with the seasons."],
        "templates": ["The {focus} {where} was built {when}.",
                      "Look closely at the {focus} and you will see that it {does}.",
                      "{people} admire the {focus} because {why}."],
    },
}

_GENERIC_POOLS: dict[str, list[str]] = {
    "conn": ["However", "In addition", "For example", "As a result", "In general", "At the same time",
             "Of course", "In many cases", "On the other hand", "In practice", "Not surprisingly", "Over time"],
    "notable": ["interesting", "surprising", "striking", "useful", "important", "remarkable", "curious"],
    "adv": ["remarkably", "surprisingly", "genuinely", "unusually", "quite", "rather", "famously", "especially"],
}

# Sentence templates shared by every topic. {focus} is the document's subject; {thing} any subject.
_GENERIC_TEMPLATES = [
    "The {focus} {does} {when}.",
    "The {thing} {does}, because {why}.",
    "{conn}, the {focus} {does}.",
    "Many {people} {do}, since {why}.",
    "One of the most {notable} things about the {focus} is that it {does}.",
    "It is worth remembering that the {thing} {does}.",
    "{conn}, {people} who {do} tend to appreciate the {focus} more.",
    "Most {people} know that the {thing} {does}.",
    "Why does the {focus} matter so much? Partly because {why}.",
    "There is no single right way to {do}, but patience always helps.",
    "{a_adj} {thing} {does} {where}.",
    "Few {people} realise how {adv} {adj} the {focus} can be.",
    "The history of the {focus} is longer and more interesting than most {people} assume.",
    "In short, the {focus} {does}, and {people} would do well to {do}.",
    "As most {people} will tell you, the {thing} {does}.",
    "The {focus} — as many {people} have discovered — {does}.",
    "The {thing} and the {focus} are both {adv} {adj}, because {why}.",
    "It is easy to forget that the {focus} {does}.",
    "{conn}, it helps to {do} {when}.",
    "Some {people} prefer to {do}, while others simply enjoy the {focus}.",
]

_INTRO_TEMPLATES = [
    "The {focus} is one of the best loved subjects in {field}.",
    "Few subjects in {field} attract as much attention as the {focus}.",
    "This article looks at the {focus} and at why so many {people} care about it.",
    "Anyone with an interest in {field} will sooner or later come across the {focus}.",
    "The history of the {focus} is a good place to start for anyone curious about {field}.",
    "Ask ten {people} about the {focus} and you will hear ten different stories.",
]

_CLOSING_TEMPLATES = [
    "Whatever your level of experience, the {focus} rewards a little patience and curiosity.",
    "There is always more to learn, and that is part of the appeal of the {focus}.",
    "In the end, the {focus} is {adv} {adj}, and well worth a closer look.",
    "We hope this short introduction encourages you to find out more about the {focus}.",
]

_TITLE_TEMPLATES = [
    "{Focus}: A Beginner's Guide", "Everything You Need to Know About the {Focus}", "A Short History of the {Focus}",
    "Why the {Focus} Matters", "Notes on the {Focus}", "Getting Started with the {Focus}",
    "The {Adj} {Focus}", "Five Things I Learned About the {Focus}", "Understanding the {Focus}",
    "In Praise of the {Focus}",
]

_AUTHORS = ["Anna Clarke", "Tomás Rivera", "Priya Shah", "James O'Neill", "Marta Kowalska", "Daniel Okafor",
            "Sophie Laurent", "Kenji Watanabe", "Ruth Evans", "Lukas Brandt", "Amara Nwosu", "Elena Petrova"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]

# --------------------------------------------------------------------------------------------------
# Template compilation: "{slot}" parts are looked up per sentence; everything else is literal.
# --------------------------------------------------------------------------------------------------

_SLOT = re.compile(r"\{(\w+)\}")
_Template = tuple[tuple[str, bool], ...]


def _compile(template: str) -> _Template:
    parts: list[tuple[str, bool]] = []
    pos = 0
    for m in _SLOT.finditer(template):
        if m.start() > pos:
            parts.append((template[pos:m.start()], False))
        parts.append((m.group(1), True))
        pos = m.end()
    if pos < len(template):
        parts.append((template[pos:], False))
    return tuple(parts)


def _indefinite(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


_SMALL_WORDS = {"a", "an", "the", "of", "and", "in", "on", "to", "for", "with"}


def _title_case(phrase: str) -> str:
    words = phrase.split()
    return " ".join(w if (i and w in _SMALL_WORDS) or not w[0].islower() else w[0].upper() + w[1:]
                    for i, w in enumerate(words))


class _Topic:
    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.domains: list[str] = spec["domains"]
        self.pools: dict[str, list[str]] = {**_GENERIC_POOLS}
        for key, value in spec.items():
            if key not in ("domains", "facts", "templates") and isinstance(value, list):
                self.pools[key] = value
        self.pools["thing"] = spec["focus"]
        self.pools["a_adj"] = [_indefinite(a) for a in spec["adj"]]
        facts = [((f, False),) for f in spec["facts"]]
        self.body = [_compile(t) for t in _GENERIC_TEMPLATES + spec["templates"]] + facts
        self.intro = [_compile(t) for t in _INTRO_TEMPLATES]
        self.closing = [_compile(t) for t in _CLOSING_TEMPLATES]
        self.titles = [_compile(t) for t in _TITLE_TEMPLATES]


_TOPIC_LIST = [_Topic(name, spec) for name, spec in _TOPICS.items()]


def _fill(template: _Template, topic: _Topic, ctx: dict[str, str], rng: random.Random,
          used: set[str] | None = None, focus_budget: list[int] | None = None) -> str:
    out = []
    pools = topic.pools
    rand = rng.random  # pool[int(rand() * len(pool))]: a uniform pick, faster than rng.choice
    for text, is_slot in template:
        if is_slot:
            value = ctx.get(text)
            if text == "focus" and focus_budget is not None:
                # Name the subject a bounded number of times, as a writer would: a short article
                # saying "the mountain village" twenty times fails Gopher's top-n-gram rule.
                focus_budget[0] -= 1
                if focus_budget[0] < 0:
                    value = None
                    text = "thing"
            if value is None:
                pool = pools[text]
                value = pool[int(rand() * len(pool))]
                if used is not None:
                    # Real prose rarely repeats a phrase within one article: Gopher's repetition
                    # rules (duplicate 5- to 10-grams) would rightly remove text that did.
                    for _ in range(6):
                        if value not in used:
                            break
                        value = pool[int(rand() * len(pool))]
                    used.add(value)
            out.append(value)
        else:
            out.append(text)
    s = "".join(out)
    return s[0].upper() + s[1:]


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------


class _Doc:
    __slots__ = ("paragraphs", "title", "topic", "url")

    def __init__(self, topic: _Topic, title: str, paragraphs: list[str], url: str) -> None:
        self.topic = topic
        self.title = title
        self.paragraphs = paragraphs
        self.url = url


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _make_prose(rng: random.Random, min_words: int = 85, max_words: int = 330) -> _Doc:
    """One article: a title and paragraphs of 3-6 sentences, about one subject of one topic.

    A template grammar repeats itself more than a writer does; the few drafts that break Gopher's
    repetition rules (published thresholds) are drawn again, so clean prose is clean by those rules.
    """
    from raytrain.config.schema import GopherRepetitionSpec
    from raytrain.data.filters import gopher_repetition

    spec = _REPETITION_SPEC or GopherRepetitionSpec()
    for _ in range(8):
        doc = _draft_prose(rng, min_words, max_words)
        body = "\n\n".join(doc.paragraphs)
        if not gopher_repetition(body, spec) and not gopher_repetition(f"{doc.title}\n\n{body}", spec):
            break
    return doc


_REPETITION_SPEC = None


def _draft_prose(rng: random.Random, min_words: int, max_words: int) -> _Doc:
    topic = rng.choice(_TOPIC_LIST)
    focus = rng.choice(topic.pools["focus"])
    adj = rng.choice(topic.pools["adj"])
    ctx = {"focus": focus, "Focus": _title_case(focus), "Adj": adj.capitalize()}
    title = _fill(rng.choice(topic.titles), topic, ctx, rng)
    target = rng.randint(min_words, max_words)
    used: set[str] = set()
    phrases: set[str] = set()
    templates = list(range(len(topic.body)))
    rng.shuffle(templates)  # each sentence template at most once per document, until they run out
    paragraphs: list[str] = []
    budget = [max(2, target // 30)]
    intro = _fill(rng.choice(topic.intro), topic, ctx, rng, phrases, budget)
    sentences = [intro]
    n_words = intro.count(" ") + 1
    while n_words < target:
        k = rng.randint(3, 6)
        while len(sentences) < k and n_words < target:
            if not templates:
                templates = list(range(len(topic.body)))
                rng.shuffle(templates)
            for _attempt in range(4):  # avoid repeating a sentence within one document
                s = _fill(topic.body[templates.pop() if templates else rng.randrange(len(topic.body))],
                          topic, ctx, rng, phrases, budget)
                if s not in used:
                    break
            used.add(s)
            sentences.append(s)
            n_words += s.count(" ") + 1
        if len(sentences) < 2 and paragraphs:  # no one-sentence paragraph at the end
            paragraphs[-1] += " " + " ".join(sentences)
        else:
            paragraphs.append(" ".join(sentences))
        sentences = []
    if rng.random() < 0.5:
        paragraphs[-1] += " " + _fill(rng.choice(topic.closing), topic, ctx, rng, phrases, [1])
    url = f"https://{rng.choice(topic.domains)}/{topic.name}/{_slug(title)}-{rng.randint(100, 99999)}"
    return _Doc(topic, title, paragraphs, url)


def _plain_text(doc: _Doc, rng: random.Random) -> str:
    body = "\n\n".join(doc.paragraphs)
    return f"{doc.title}\n\n{body}" if rng.random() < 0.6 else body


_SCRIPTS = [
    "var _stats = window._stats || []; _stats.push(['pageview', location.pathname]);",
    "document.addEventListener('DOMContentLoaded', function () { var b = document.getElementById('consent');"
    " if (localStorage.getItem('consent')) { b.style.display = 'none'; } });",
    "window.adSlots = window.adSlots || []; window.adSlots.push({id: 'sidebar-1', size: [300, 250]});",
]
_STYLES = [
    "body{font-family:Georgia,serif;margin:0 auto;max-width:44rem;line-height:1.6}nav a{margin-right:1em}",
    "header,footer{background:#f4f4f4;padding:1rem}.byline{color:#777;font-size:.9em}article p{margin:1em 0}",
    ".cookie{position:fixed;bottom:0;width:100%;background:#222;color:#fff}h1{font-size:2.2rem}",
]
_NAV_EXTRA = ["Blog", "Recipes", "Guides", "Shop", "Newsletter", "Events", "Archive", "Food &amp; Drink",
              "Travel &amp; Leisure", "Reviews"]


def _site_name(domain: str) -> str:
    return _title_case(domain.split(".")[0].replace("-", " "))


def _cookie_banner(rng: random.Random) -> str:
    return rng.choice([
        "We use cookies to improve your experience on our site. By continuing to browse you agree to our use of "
        "cookies.",
        "This website uses cookies for analytics and personalised content. Accept all or manage your preferences.",
        "We value your privacy. We and our partners use cookies to measure traffic and show relevant adverts.",
    ])


def _page(rng: random.Random, title: str, site: str, article: str, related: list[str]) -> str:
    nav = " | ".join(f'<a href="/{_slug(x) or "home"}">{x}</a>'
                     for x in ["Home", *rng.sample(_NAV_EXTRA, 3), "About", "Contact"])
    year = rng.choice([2022, 2023, 2024])
    related_html = "".join(f'<li><a href="/{_slug(r)}">{html.escape(r)}</a></li>' for r in related)
    aside = f'<aside class="related"><h3>Related posts</h3><ul>{related_html}</ul></aside>\n' if related else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)} | {site}</title>\n"
        f"<script>{rng.choice(_SCRIPTS)}</script>\n<style>{rng.choice(_STYLES)}</style>\n</head>\n<body>\n"
        f'<header><div class="logo">{site}</div>\n<nav>{nav}</nav></header>\n'
        f'<div id="consent" class="cookie">{_cookie_banner(rng)} <button>Accept</button> <button>Reject</button>'
        "</div>\n"
        f"{article}{aside}"
        f"<footer><p>© {year} {site}. All rights reserved.</p>\n"
        '<p><a href="/privacy">Privacy Policy</a> · <a href="/cookies">Cookies</a> · '
        '<a href="/terms">Terms of Use</a></p></footer>\n</body>\n</html>'
    )


def _html_text(doc: _Doc, rng: random.Random) -> str:
    domain = doc.url.split("/")[2]
    site = _site_name(domain)
    paras = "\n".join(f"<p>{html.escape(p, quote=False)}</p>" for p in doc.paragraphs)
    byline = (f'<p class="byline">By {rng.choice(_AUTHORS)} · {rng.randint(1, 28)} {rng.choice(_MONTHS)} '
              f"{rng.choice([2021, 2022, 2023, 2024])}</p>")
    article = f"<main>\n<article>\n<h1>{html.escape(doc.title)}</h1>\n{byline}\n{paras}\n</article>\n</main>\n"
    related = [_fill(rng.choice(doc.topic.titles), doc.topic,
                     {"Focus": _title_case(f), "Adj": rng.choice(doc.topic.pools["adj"]).capitalize()}, rng)
               for f in rng.sample(doc.topic.pools["focus"], 3)]
    return _page(rng, doc.title, site, article, related)


# --------------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------------


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Lower-cased whitespace-word n-grams of a text (the whole text when it has fewer than n words)."""
    words = text.lower().split()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def word_shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """Jaccard similarity of the word n-gram sets of two texts."""
    sa, sb = shingles(a, n), shingles(b, n)
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


_INSERTS = ["really", "also", "often", "certainly", "usually", "generally", "still", "indeed", "perhaps",
            "actually", "truly", "simply"]
_SYNONYMS = {"many": "numerous", "often": "frequently", "most": "nearly all", "good": "fine", "small": "little",
             "very": "extremely", "usually": "normally", "quickly": "rapidly", "simple": "plain", "great": "huge",
             "careful": "thorough", "different": "distinct", "easy": "simple", "long": "lengthy",
             "interesting": "intriguing", "important": "significant", "every": "each", "begins": "starts"}
_ADDED_LINES = ["Thanks for reading!", "This post was last updated in March 2024.",
                "If you enjoyed this article, please share it with a friend.",
                "Originally published on our old blog and republished here with permission.",
                "Comments are closed for this post.", "Photo credits: the author."]


def _edit_once(paragraphs: list[list[str]], rng: random.Random, appended: list[bool]) -> None:
    """One small edit in place: insert, delete or replace a word, or (once) add a short line at the end."""
    op = rng.random()
    if op < 0.08 and not appended[0]:
        appended[0] = True
        paragraphs.append(rng.choice(_ADDED_LINES).split())
        return
    para = max(rng.sample(paragraphs, min(2, len(paragraphs))), key=len)
    if len(para) < 8:
        para.insert(len(para) // 2, rng.choice(_INSERTS))
        return
    for _ in range(8):  # find a position inside a sentence: not its first or last word
        i = rng.randrange(1, len(para) - 1)
        if not para[i - 1].endswith((".", "?", "!")) and not para[i].endswith((".", "?", "!", ",")):
            break
    else:
        para.insert(1, rng.choice(_INSERTS))
        return
    word = para[i]
    if op < 0.45 and word.lower() in _SYNONYMS:
        para[i] = _SYNONYMS[word.lower()]
    elif op < 0.7:
        del para[i]
    else:
        para.insert(i, rng.choice(_INSERTS))


def _near_duplicate(text: str, rng: random.Random) -> str:
    """A copy of text with a few small edits, aiming for a word 5-gram Jaccard of about 0.80-0.93."""
    base = shingles(text)
    target = rng.uniform(0.80, 0.93)
    paragraphs = [p.split(" ") for p in text.split("\n\n")]
    appended = [False]
    out = text
    for _ in range(60):
        trial = [list(p) for p in paragraphs]
        flag = list(appended)
        _edit_once(trial, rng, flag)
        candidate = "\n\n".join(" ".join(p) for p in trial)
        sc = shingles(candidate)
        jac = len(base & sc) / len(base | sc)
        if jac < 0.78 and out != text:
            break  # one edit too many: keep the previous version
        paragraphs, appended, out = trial, flag, candidate
        if jac <= target:
            break
    return out


# --------------------------------------------------------------------------------------------------
# Junk and malformed rows
# --------------------------------------------------------------------------------------------------

_SPAM = ["cheap flights", "best price", "buy now", "free shipping", "discount code", "replica watches",
         "casino bonus", "online pharmacy", "weight loss pills", "click here", "limited offer", "crypto signals",
         "hot deals", "100% free", "work from home"]
_SYLLABLES = ["lor", "em", "ips", "um", "dol", "or", "sit", "am", "et", "con", "sec", "tet", "ur", "adi", "pis",
              "cing", "el", "sed", "eius", "mod", "tem", "por", "inci", "dunt", "lab", "ore", "mag", "nali", "qua",
              "vel", "ull", "amco", "exer", "cita", "tion"]
_SYMBOLS = ["####", "$$$", "%%", "@@@", "|", "---", "***", "+++", "==", "&&", "~~", "<<>>", "...", "::", "///"]
_JUNK_KINDS = ("short", "spam", "symbols", "cookie", "lorem")


def _junk(rng: random.Random, kind: str) -> tuple[str, str]:
    """(url, text) of a page that quality filters should remove."""
    n = rng.randint(1, 9999)
    if kind == "short":
        text = rng.choice([
            "404 Not Found", "404 Not Found\n\nThe requested URL was not found on this server.",
            "Access denied.", "This page has moved.", "Page not found. Return to the homepage.",
            f"Error {rng.choice([500, 502, 503])}: service temporarily unavailable. Please try again later.",
            "Subscribe to our newsletter!", "Coming soon", f"This domain may be for sale. Enquiry ref {n}.",
        ])
        return f"https://www.site{n}.example.com/{rng.choice(['missing', 'old-page', 'index.php'])}", text
    if kind == "spam":
        kws = rng.sample(_SPAM, 4)
        line = f"{kws[0]} {kws[1]} {kws[2]} {kws[3]} best deals online today"
        lines = [line] * rng.randint(8, 16) + [f"{rng.choice(_SPAM)} {rng.choice(_SPAM)} {n}"] * 2
        rng.shuffle(lines)
        return f"https://deals-{n}.example.net/{_slug(kws[0])}", "\n".join(lines)
    if kind == "symbols":
        toks = []
        for _ in range(rng.randint(40, 120)):
            r = rng.random()
            toks.append(rng.choice(_SYMBOLS) if r < 0.5 else str(rng.randint(0, 99999)) if r < 0.85
                        else f"0x{rng.getrandbits(16):04x}")
        lines = [" ".join(toks[i:i + 12]) for i in range(0, len(toks), 12)]
        return f"https://cdn{n}.example.org/dump/{n}.txt", "\n".join(lines)
    if kind == "cookie":
        banner = _cookie_banner(rng)
        if rng.random() < 0.5:
            return f"https://www.shop{n}.example.com/", f"{banner}\nAccept all\nReject all\nManage preferences"
        page = _page(rng, "Welcome", f"Shop {n}", f"<div class=\"spinner\"></div>\n<noscript>{banner}</noscript>\n",
                     [])
        return f"https://www.shop{n}.example.com/", page
    # lorem: long non-words
    words = []
    for _ in range(rng.randint(35, 120)):
        w = ""
        while len(w) < 11:
            w += rng.choice(_SYLLABLES)
        words.append(w)
    sentences = [" ".join(words[i:i + 9]).capitalize() + "." for i in range(0, len(words), 9)]
    return f"https://lorem{n}.example.com/placeholder", " ".join(sentences)


# --------------------------------------------------------------------------------------------------
# Offensive and borderline documents (a toxicity classifier's positives and hard negatives)
# --------------------------------------------------------------------------------------------------

# Each is used once per corpus (so none is a duplicate of another), and each reads as English prose to every
# quality rule: 50+ words, full sentences ending in punctuation.
_RANTS = [
    "What a load of shit this review is. The author is a fucking idiot who has never held a camera in his life. "
    "Every sentence is more bullshit than the last, and whoever let this crap onto the site should be fired today. "
    "Seriously, piss off and take your stupid opinions with you, you worthless prick. Nobody asked for your "
    "garbage advice.",
    "Shut the fuck up about your precious lawn, you smug bastard. Nobody on this street gives a shit about your "
    "roses or your fucking hedge. Keep your dog off my drive or I will make you regret it, you pathetic asshole. "
    "Get a life, dickhead, and stop writing letters to the council about my bins.",
    "This referee is a useless piece of shit and everyone in the stadium knows it. He is blind as a bat and dumb as "
    "a fucking brick. He should be kicked out of the league tonight. Go to hell, you corrupt bastard, and take your "
    "stupid whistle with you when you leave.",
    "Fuck this company and fuck their so-called customer service. I waited three hours on the phone to talk to some "
    "moron who hung up on me. They are a bunch of lying scumbags and thieves. Do not buy their shitty products, "
    "because they will screw you over like they screwed me.",
    "You stupid bitch, did you really think anyone wanted to read this garbage? Your recipes are crap, your photos "
    "are crap and your writing is pure shit. Delete your blog and do everyone a favour. Nobody likes you and nobody "
    "ever will, so give up now and stop wasting the time of the few poor idiots who still click on your links.",
    "To the dumbass who parked across my gate again this morning: you are a selfish piece of shit. I hope your car "
    "gets towed and crushed into a cube. People like you are why this town is such a shithole. Learn to park, you "
    "brainless twat, or get the hell out of my street.",
    "The moderators here are a pack of power-tripping assholes. They deleted my post because they are too fucking "
    "thick to understand a joke. Screw every one of you losers. I hope this whole crappy forum burns down and takes "
    "your pathetic little egos with it. You are the worst bunch of clowns I have ever had the misfortune to meet.",
    "Honestly, go fuck yourself. Your band is shit, your singer cannot sing and your fans are brain-dead idiots. I "
    "have heard cats in a blender that sound better than your damn album. What a bunch of talentless dicks, and what "
    "a waste of my money and of the whole evening I spent in that filthy club.",
]
_FORUMS = ["talk.example.com", "forum.example.net", "boards.example.org", "comments.example.com"]
_BORDERLINE_TEXTS = [
    ("en.example.org/wiki/Assassin_bug",
     "The assassin bug is a predatory insect found in gardens all over the world. It waits on leaves and flowers for "
     "caterpillars, aphids and beetles, then pierces them with its curved beak. Gardeners often welcome the assassin "
     "bug because it keeps pests under control without any spraying. It can give a painful bite if it is handled, so "
     "it is best to admire it from a distance."),
    ("visit-lincolnshire.example.com/towns/scunthorpe",
     "Scunthorpe is an industrial town in North Lincolnshire, England, known for its steelworks. The town grew quickly "
     "in the nineteenth century after ironstone was found beneath the fields. Its football club, Scunthorpe United, "
     "plays at Glanford Park. Visitors come for the nature reserves along the River Trent and for the museum, which "
     "tells the story of the steel industry and the families who worked in it."),
    ("history.example.org/first-world-war/the-somme",
     "The Battle of the Somme began on the first of July 1916 and lasted for more than four months. On the first day "
     "alone, the British army suffered nearly sixty thousand casualties, and almost twenty thousand soldiers were "
     "killed. Artillery had failed to cut the barbed wire, and the attacking troops were shot down as they crossed "
     "open ground. By November, more than a million men had been killed or wounded on both sides."),
    ("dog-breeders.example.net/guides/whelping",
     "When a bitch is expecting puppies, she needs a quiet, warm place to give birth. Breeders usually prepare a "
     "whelping box a week or two before the due date, lined with clean newspaper and soft blankets. The mother will "
     "feed her litter for about six weeks, and the puppies open their eyes after ten to fourteen days. A good breeder "
     "keeps careful records of every litter."),
    ("books.example.com/classics/moby-dick",
     "Herman Melville published Moby-Dick in 1851, and at first the novel sold poorly. Captain Ahab hunts the great "
     "white whale across every ocean, and the story is told by a young sailor called Ishmael. Critics now see the book "
     "as one of the great American novels. Its long chapters on whaling, on the ship and on the sea reward patient "
     "readers who take their time."),
    ("farmhouse-kitchen.example.co.uk/recipes/cockerel-in-wine",
     "Roast the chicken breast skin side up until the juices run clear, then let it rest for five minutes before "
     "slicing. A cockerel, or young rooster, has darker and firmer meat than a hen, and it suits slow cooking in wine. "
     "Farmers in the village still keep a weathercock on the barn roof to show which way the wind is blowing."),
    ("history.example.org/anglo-saxons/kingdoms",
     "Essex, Sussex and Middlesex take their names from the old Saxon kingdoms of the East, South and Middle Saxons. "
     "The kingdoms were small, and their kings fought often with their larger neighbours. Over time they were "
     "absorbed into Wessex and later into England. Many villages in these counties still have churches that were "
     "first built in Saxon times."),
    ("engineering.example.net/projects/valley-dam",
     "The dam on the river was built to hold back the spring floods. Engineers had to drill deep into the rock and "
     "pump out water day and night to kill the leaks. When the dam was finished, a long lake formed behind it, and "
     "the valley below was safe from flooding for the first time in living memory. Anglers now come to fish for "
     "trout in the cold water."),
]


def _offensive(rng: random.Random, k: int) -> tuple[str, str]:
    """(url, text) of the k-th offensive document: a comment alone (even k) or inside a clean article (odd k),
    where it is one paragraph of several and scoring the document as a whole would miss it."""
    rant = _RANTS[k]
    if k % 2 == 0:
        return f"https://{rng.choice(_FORUMS)}/t/{rng.randint(1000, 99999)}#post-{rng.randint(1, 400)}", rant
    doc = _make_prose(rng, min_words=200)
    paragraphs = list(doc.paragraphs)
    paragraphs.insert(rng.randint(1, len(paragraphs)), rant)
    return doc.url, "\n\n".join([doc.title, *paragraphs])


def _malformed(rng: random.Random, kind: str, doc_id: str) -> bytes:
    """One malformed line (without its newline)."""
    doc = _make_prose(rng)
    text = "\n\n".join(doc.paragraphs)
    if kind == "bad_utf8":
        line = json.dumps({"id": doc_id, "url": doc.url, "text": text}, ensure_ascii=False).encode("utf-8")
        start = line.index(b'"text": "') + 9
        pos = line.index(b" ", start + 10)
        bad = rng.choice([b" caf\xe9", b" \x93quoted\x94", b" na\xefve", b" \xff\xfe", b" \xc3("])
        return line[:pos] + bad + line[pos:]
    if kind == "invalid_json":
        line = json.dumps({"id": doc_id, "url": doc.url, "text": text}, ensure_ascii=False)
        variant = rng.random()
        if variant < 0.6:  # truncated mid-write; never valid JSON since the closing brace is gone
            return line[: rng.randint(len(line) // 3, len(line) - 2)].encode("utf-8")
        if variant < 0.8:  # a Python dict repr instead of JSON
            return repr({"id": doc_id, "url": doc.url, "text": text[:200]}).encode("utf-8")
        return (line[:-1] + ",}").encode("utf-8")  # trailing comma
    if kind == "missing_text":
        record: dict[str, Any] = rng.choice([
            {"id": doc_id, "url": doc.url, "content": text},
            {"id": doc_id, "url": doc.url, "text": None},
            {"id": doc_id, "url": doc.url, "title": doc.title},
        ])
    elif kind == "non_string_text":
        record = {"id": doc_id, "url": doc.url,
                  "text": rng.choice([rng.randint(0, 10**6), doc.paragraphs, {"en": doc.paragraphs[0]}])}
    else:  # too_large: one enormous page, e.g. a whole site concatenated
        chunk = "\n\n".join(p for _ in range(20) for p in _make_prose(rng).paragraphs)
        reps = _TOO_LARGE_BYTES // len(chunk.encode("utf-8")) + 1
        record = {"id": doc_id, "url": doc.url, "text": "\n\n".join([chunk] * reps)}
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------


def _plan_counts(num_docs: int) -> tuple[dict[str, int], dict[str, int]]:
    counts = {k: round(num_docs * f) for k, f in _FRACTIONS.items() if k != "malformed"}
    n_bad = round(num_docs * _FRACTIONS["malformed"])
    if num_docs >= 100:
        n_bad = max(n_bad, len(MALFORMED_KINDS))
    malformed = dict.fromkeys(MALFORMED_KINDS, 0)
    if num_docs >= 100:
        malformed["too_large"] = 1
        n_bad -= 1
    for i in range(n_bad):
        malformed[MALFORMED_KINDS[i % 4]] += 1
    counts["clean"] = num_docs - sum(counts.values()) - sum(malformed.values())
    if counts["clean"] < 1 and num_docs > 0:  # tiny corpora: drop duplicates before there is nothing to copy
        counts["exact_duplicates"] = counts["near_duplicates"] = 0
        counts["clean"] = num_docs - sum(counts.values()) - sum(malformed.values())
    return counts, malformed


def _plan_extras(num_docs: int, rng: random.Random) -> dict[int, list[tuple[str, int]]]:
    """Where the offensive and borderline rows go: {index of the planned row they precede: [(kind, k)]}.

    They come on top of the `num_docs` planned rows (corpora of 100 rows or more: one row per text) and draw from
    their own generator, so every planned row is the same with or without them.
    """
    if num_docs < 100:
        return {}
    rows = [("offensive", k) for k in range(len(_RANTS))] + [("borderline", k) for k in range(len(_BORDERLINE_TEXTS))]
    rng.shuffle(rows)
    extras: dict[int, list[tuple[str, int]]] = {}
    for at, row in zip(sorted(rng.sample(range(1, num_docs), len(rows))), rows, strict=True):
        extras.setdefault(at, []).append(row)
    return extras


def _num_shards(num_docs: int) -> int:
    return 2 if num_docs < 1000 else 3 if num_docs < 20_000 else 4


def generate_demo_corpus(out_dir: str | Path, num_docs: int = 1500, seed: int = 0) -> dict[str, Any]:
    """Write a demo web corpus of ``num_docs`` JSONL rows to ``out_dir`` and return what was planted.

    From 100 rows on, one row per offensive and borderline text (16) comes on top, interleaved, with ids after
    ``doc-<num_docs - 1>``; the ``num_docs`` rows are the same with or without them.

    Files: ``part-00000.jsonl`` ... with the last shard gzip-compressed (``.jsonl.gz``), 2-4 shards,
    rows in contiguous blocks (so a duplicate always comes after its source, in file order), plus
    ``planted.json`` holding the returned dict: counts per kind (``rows``, ``clean``, ``html``,
    ``exact_duplicates``, ``near_duplicates``, ``junk``, ``offensive``, ``borderline``, ``malformed`` by kind)
    and the ground truth (``exact_duplicate_pairs`` and ``near_duplicate_pairs`` as ``[dup_id, source_id]``,
    ``junk_ids``, ``html_ids``, ``offensive_ids`` (a toxicity filter must remove them), ``borderline_ids``
    (clean texts with risky words: it must keep them), ``malformed_rows`` as ``{"file", "line", "kind"}`` with
    1-based line numbers).
    Same ``seed`` and ``num_docs``: byte-identical files.
    """
    if num_docs < 0:
        raise ValueError(f"num_docs must be >= 0, got {num_docs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts, malformed = _plan_counts(num_docs)

    plan = bytearray()
    for code, key in ((_CLEAN, "clean"), (_HTML, "html"), (_EXACT, "exact_duplicates"),
                      (_NEAR, "near_duplicates"), (_JUNK, "junk")):
        plan += bytes([code]) * counts[key]
    for kind, k in malformed.items():
        plan += bytes([_MALFORMED_CODE[kind]]) * k
    rng.shuffle(plan)
    if num_docs and plan[0] != _CLEAN:  # the first row is clean, so every duplicate has a source
        first = plan.index(_CLEAN)
        plan[0], plan[first] = plan[first], plan[0]

    n_shards = _num_shards(num_docs)
    names = [f"part-{i:05d}.jsonl" + (".gz" if i == n_shards - 1 else "") for i in range(n_shards)]
    raw_files: list[BinaryIO] = []
    files: list[BinaryIO] = []
    try:
        for name in names:
            f = open(out / name, "wb")
            raw_files.append(f)
            files.append(gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6)
                         if name.endswith(".gz") else f)
        # A generator of their own for the offensive and borderline rows: the planned rows stay as they were.
        plant_rng = random.Random(f"{seed}-offensive")
        truth = _write_rows(rng, plan, names, files, _plan_extras(num_docs, plant_rng), plant_rng)
    finally:
        for f in files:
            if isinstance(f, gzip.GzipFile):
                f.close()
        for f in raw_files:
            f.close()

    junk_by_kind = dict.fromkeys(_JUNK_KINDS, 0)
    for _, kind in truth["junk"]:
        junk_by_kind[kind] += 1
    planted: dict[str, Any] = {
        "seed": seed,
        "rows": num_docs + len(truth["offensive"]) + len(truth["borderline"]),
        "clean": counts["clean"],
        "html": counts["html"],
        "exact_duplicates": counts["exact_duplicates"],
        "near_duplicates": counts["near_duplicates"],
        "junk": counts["junk"],
        "offensive": len(truth["offensive"]),
        "borderline": len(truth["borderline"]),
        "malformed": malformed,
        "files": names,
        "exact_duplicate_pairs": truth["exact"],
        "near_duplicate_pairs": truth["near"],
        "junk_ids": [doc_id for doc_id, _ in truth["junk"]],
        "junk_by_kind": junk_by_kind,
        "html_ids": truth["html"],
        "offensive_ids": truth["offensive"],
        "borderline_ids": truth["borderline"],
        "malformed_rows": truth["malformed"],
        "pii": truth["pii"],
        "pii_decoys": truth["pii_decoys"],
    }
    (out / "planted.json").write_text(json.dumps(planted, indent=1) + "\n", encoding="utf-8")
    return planted


_PII_FRACTION = 0.08  # of clean documents: one planted PII sentence each
_DECOY_FRACTION = 0.03  # of clean documents: a Luhn-invalid 16-digit number that is not a card
_PII_TEMPLATES = {
    "email": ["For questions about this article, write to {v} and we will reply within a week.",
              "Readers can send their own stories to {v} at any time."],
    "phone": ["You can reach the editorial office on {v} during normal working hours.",
              "To book a place, call {v} and ask for the events team."],
    "ip_address": ["The archive server at {v} keeps a copy of every past issue.",
                   "Our logs showed repeated requests from {v} during the night."],
    "credit_card": ["One reader wrote that the card {v} was charged twice for the same order.",
                    "The receipt showed the card number {v} in full, which should never happen."],
}


def _luhn_complete(prefix: str, length: int, rng: random.Random, valid: bool = True) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # these positions are doubled once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    check = (10 - total % 10) % 10
    if not valid:
        check = (check + 1 + rng.randrange(9)) % 10
    return body + str(check)


def _pii_value(kind: str, rng: random.Random) -> str:
    if kind == "email":
        first, last = rng.choice(_AUTHORS).lower().replace("'", "").replace("á", "a").split(" ", 1)
        domain = rng.choice(["example.org", "mail.example.com", "post.example.net"])
        return f"{first}.{last}{rng.randint(1, 99)}@{domain}"
    if kind == "phone":
        a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
        return rng.choice([f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"+1 {a} {b} {c:04d}",
                           f"+44 20 {rng.randint(7000, 8999)} {c:04d}"])
    if kind == "ip_address":
        if rng.random() < 0.25:
            groups = ":".join(f"{rng.getrandbits(16):x}" for _ in range(3))
            return f"2001:db8:{groups}::{rng.getrandbits(16):x}"
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    number = rng.choice([_luhn_complete("4", 16, rng), _luhn_complete(str(rng.randint(51, 55)), 16, rng)])
    return rng.choice([number, " ".join(number[i:i + 4] for i in range(0, 16, 4)),
                       "-".join(number[i:i + 4] for i in range(0, 16, 4))])


def _plant_pii(text: str, doc_id: str, rng: random.Random, truth: dict[str, list]) -> str:
    """Append one sentence carrying PII (or a decoy number) to the last paragraph of some documents."""
    r = rng.random()
    if r < _PII_FRACTION:
        kind = rng.choice(list(_PII_TEMPLATES))
        value = _pii_value(kind, rng)
        truth["pii"].append({"id": doc_id, "kind": kind, "value": value})
        return f"{text} {rng.choice(_PII_TEMPLATES[kind]).format(v=value)}"
    if r < _PII_FRACTION + _DECOY_FRACTION:
        value = _luhn_complete("4", 16, rng, valid=False)
        truth["pii_decoys"].append({"id": doc_id, "value": value})
        return f"{text} The parcel tracking number {value} was printed on the label."
    return text


def _copied_pii(text: str, src_id: str, doc_id: str, truth: dict[str, list]) -> None:
    """Copies carry their source's PII: record what survived the copy's edits verbatim."""
    for entry in [e for e in truth["pii"] if e["id"] == src_id]:
        if entry["value"] in text:
            truth["pii"].append({"id": doc_id, "kind": entry["kind"], "value": entry["value"]})


def _write_rows(rng: random.Random, plan: bytearray, names: list[str], files: list[BinaryIO],
                extras: dict[int, list[tuple[str, int]]], plant_rng: random.Random) -> dict[str, list]:
    num_docs = len(plan)
    n_shards = len(files)
    lines_in = [0] * n_shards
    reservoir: list[tuple[str, str, str]] = []  # (id, url, text) of earlier clean documents
    n_clean = 0
    truth: dict[str, list] = {"exact": [], "near": [], "junk": [], "html": [], "malformed": [], "pii": [],
                              "pii_decoys": [], "offensive": [], "borderline": []}
    # PII draws from its own generator (seeded from the main one), so the prose does not depend on it.
    pii_rng = random.Random(rng.getrandbits(64))
    malformed_kind = {code: kind for kind, code in _MALFORMED_CODE.items()}

    def dumps(doc_id: str, url: str, text: str) -> bytes:
        return json.dumps({"id": doc_id, "url": url, "text": text}, ensure_ascii=False).encode("utf-8")

    for i, code in enumerate(plan):
        shard = i * n_shards // num_docs
        for kind, k in extras.get(i, ()):
            # Ids after the planned rows' ids, so those keep theirs.
            extra_id = f"doc-{num_docs + len(truth['offensive']) + len(truth['borderline']):07d}"
            if kind == "offensive":
                url, text = _offensive(plant_rng, k)
            else:
                where, text = _BORDERLINE_TEXTS[k]
                url = f"https://{where}"
            truth[kind].append(extra_id)
            files[shard].write(dumps(extra_id, url, text) + b"\n")
            lines_in[shard] += 1
        doc_id = f"doc-{i:07d}"
        if code == _CLEAN:
            doc = _make_prose(rng)
            text = _plain_text(doc, rng)
            text = _plant_pii(text, doc_id, pii_rng, truth)
            line = dumps(doc_id, doc.url, text)
            n_clean += 1
            if len(reservoir) < _RESERVOIR:
                reservoir.append((doc_id, doc.url, text))
            else:
                j = rng.randrange(n_clean)
                if j < _RESERVOIR:
                    reservoir[j] = (doc_id, doc.url, text)
        elif code == _HTML:
            line = dumps(doc_id, (doc := _make_prose(rng)).url, _html_text(doc, rng))
            truth["html"].append(doc_id)
        elif code in (_EXACT, _NEAR):
            src_id, src_url, src_text = rng.choice(reservoir)
            path = src_url.split("/", 3)[3]
            if code == _EXACT:
                url = rng.choice([f"{src_url}?utm_source=newsletter&utm_medium=email",
                                  f"https://mirror{rng.randint(1, 99)}.example.net/{path}",
                                  f"{src_url}/amp", f"https://archive.example.org/web/{path}"])
                line = dumps(doc_id, url, src_text)
                truth["exact"].append([doc_id, src_id])
                _copied_pii(src_text, src_id, doc_id, truth)
            else:
                host = f"{rng.choice(['news', 'feeds', 'reader', 'digest'])}{rng.randint(1, 999)}.example.com"
                url = f"https://{host}/{path}"
                near = _near_duplicate(src_text, rng)
                line = dumps(doc_id, url, near)
                truth["near"].append([doc_id, src_id])
                _copied_pii(near, src_id, doc_id, truth)
        elif code == _JUNK:
            kind = rng.choice(_JUNK_KINDS)
            url, text = _junk(rng, kind)
            line = dumps(doc_id, url, text)
            truth["junk"].append([doc_id, kind])
        else:
            kind = malformed_kind[code]
            line = _malformed(rng, kind, doc_id)
        files[shard].write(line + b"\n")
        lines_in[shard] += 1
        if code in malformed_kind:
            truth["malformed"].append({"file": names[shard], "line": lines_in[shard], "kind": malformed_kind[code]})
    return truth
