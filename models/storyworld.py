"""A generated corpus of simple children's stories and story-request chats: the training text of the
project's own demo model (models/train_storyteller.py). Every word comes from the lists below, so the corpus,
and a model trained on it, can be shipped under the project's licence.

    python -m models.storyworld out.txt --docs 1000 --seed 0     # one document per block, "\\n\\n\\n" between

A document is either a plain story or a chat in the runtime's plain chat format ("User: ...\\nAssistant: ...",
as `sparserun chat` formats a conversation for a model without a chat template), where the user asks for a
story about someone, something or somewhere and the assistant tells one that features it.
"""
import argparse
import random
import sys

GIRLS = ["Lily", "Mia", "Anna", "Zoe", "Ella", "Lucy", "Sara", "Emma", "Ruby", "Rosie", "Amy", "Kate", "Nora",
         "Daisy", "Sophie", "Molly", "Grace", "Ivy", "Chloe", "Hannah"]
BOYS = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Finn", "Noah", "Leon", "Jake", "Oliver", "Harry",
        "Billy", "Adam", "Luke", "Oscar", "Theo", "Joe", "Dan"]
ANIMALS = ["cat", "dog", "bird", "rabbit", "fox", "bear", "duck", "frog", "mouse", "owl", "turtle", "puppy",
           "kitten", "pony", "squirrel", "hedgehog", "goat", "lamb", "pig", "deer"]
PET_NAMES = ["Spot", "Max", "Bella", "Coco", "Pip", "Sunny", "Fluffy", "Bubbles", "Patch", "Whiskers", "Buddy",
             "Ginger", "Button", "Pebble", "Snowy"]
TRAITS = ["kind", "brave", "shy", "curious", "happy", "clever", "gentle", "funny", "busy", "cheerful", "quiet",
          "friendly"]
SIZES = ["little", "small", "big", "tiny"]
PLACES = [("the park", "in"), ("the forest", "in"), ("the beach", "at"), ("the garden", "in"), ("the farm", "on"),
          ("the lake", "by"), ("the hill", "on"), ("the town", "in"), ("the school", "at"), ("the river", "by"),
          ("the meadow", "in"), ("the zoo", "at"), ("the library", "in"), ("the market", "at")]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "brown", "shiny"]
THINGS = ["ball", "kite", "hat", "boat", "box", "book", "doll", "car", "drum", "bucket", "blanket", "balloon",
          "shell", "stone", "cup", "bike", "train", "spoon", "key", "bell"]
HIDING = ["under a big tree", "behind a rock", "in the tall grass", "next to the bench", "under a pile of leaves",
          "near the old fence", "inside a hollow log", "behind the shed", "under a bush", "by the little bridge"]
FEARS = [("the dark", "the night was not so scary after all"), ("the big waves", "the water was fun to play in"),
         ("the loud thunder", "the storm could not hurt them inside"), ("the tall slide", "the slide was fast and fun"),
         ("the big dog next door", "the dog only wanted to play"), ("the deep water", "swimming was fun with a friend")]
MAKES = [("bake a cake", "the cake", "flour and eggs and sugar", "sweet and soft"),
         ("build a sand castle", "the castle", "wet sand and little shells", "tall and strong"),
         ("draw a picture", "the picture", "crayons and a big sheet of paper", "bright and pretty"),
         ("make a snowman", "the snowman", "snow and a carrot and two buttons", "round and funny"),
         ("plant a garden", "the garden", "seeds and water and soil", "green and full of flowers"),
         ("build a tree house", "the tree house", "wood and nails and rope", "high and safe")]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited"]
FEELINGS_BAD = ["sad", "upset", "worried", "scared"]
WEATHER = ["It was a sunny day.", "The sun was warm and bright.", "It was a windy morning.",
           "The sky was blue and clear.", "It was a cold winter day.", "It was a warm summer evening."]
OPENINGS = ["Once upon a time,", "One day,", "Once there was", "Long ago,", "One morning,"]
MORALS = ["Sharing makes everyone happy.", "Friends help each other.", "Being brave is good.",
          "It is good to try again.", "Kindness is always the best way.", "Together we can do anything."]


class Who:
    """A character: a child or a named animal, with pronouns."""

    def __init__(self, rng, kind=None, name=None):
        kind = kind or rng.choice(["girl", "boy", "animal"])
        self.kind = kind
        if kind == "girl":
            self.name, self.he, self.him, self.his = name or rng.choice(GIRLS), "she", "her", "her"
            self.noun = "girl"
        elif kind == "boy":
            self.name, self.he, self.him, self.his = name or rng.choice(BOYS), "he", "him", "his"
            self.noun = "boy"
        else:
            self.noun = rng.choice(ANIMALS)
            self.name = name or rng.choice(PET_NAMES)
            self.he, self.him, self.his = rng.choice([("he", "him", "his"), ("she", "her", "her")])
        self.trait = rng.choice(TRAITS)
        self.size = rng.choice(SIZES)

    def intro(self, rng):
        a = "an" if self.size[0] in "aeiou" else "a"
        return rng.choice([f"{a} {self.size} {self.noun} named {self.name}",
                           f"a {self.trait} {self.noun} named {self.name}"])


def cap(s):
    return s[0].upper() + s[1:]


def thing(rng):
    return f"{rng.choice(COLORS)} {rng.choice(THINGS)}"


def opening(rng, hero):
    o = rng.choice(OPENINGS)
    if o == "Once there was":
        return f"Once there was {hero.intro(rng)}."
    return f"{o} there was {hero.intro(rng)}." if o != "One morning," else f"One morning, {hero.intro(rng)} woke up early."


def story_lost(rng, hero, friend, place, obj):
    where, prep = place
    hide = rng.choice(HIDING)
    s = [opening(rng, hero), f"{cap(hero.he)} had a {obj}. {cap(hero.he)} loved it very much.",
         rng.choice(WEATHER), f"{hero.name} took the {obj} to {where}."]
    s.append(f"{cap(hero.he)} played with it all day. But then {hero.he} could not find it!")
    s.append(f"{hero.name} felt {rng.choice(FEELINGS_BAD)}. \"Where is my {obj.split()[-1]}?\" {hero.he} cried.")
    s.append(f"{friend.name} the {friend.noun} saw {hero.him}. \"I will help you look,\" said {friend.name}.")
    s.append(f"They looked everywhere {prep} {where}. At last, {friend.name} found the {obj} {hide}.")
    s.append(f"\"Thank you!\" said {hero.name}. {cap(hero.he)} gave {friend.name} a big hug.")
    s.append(f"From that day on, {hero.name} and {friend.name} were best friends. {rng.choice(MORALS[:2])}")
    return " ".join(s)


def story_share(rng, hero, friend, place, obj):
    where, prep = place
    s = [opening(rng, hero), f"{cap(hero.he)} had a new {obj}.", f"One day {hero.he} went to {where} to play."]
    s.append(f"There {hero.he} met {friend.name}, a {friend.trait} {friend.noun}.")
    s.append(f"\"Can I play with your {obj.split()[-1]}?\" asked {friend.name}.")
    s.append(f"\"No, it is mine!\" said {hero.name}. {friend.name} was {rng.choice(FEELINGS_BAD)} and walked away.")
    s.append(f"{hero.name} played alone, but it was not fun. {cap(hero.he)} thought about {friend.name}.")
    s.append(f"So {hero.name} ran to {friend.name} and said, \"I am sorry. Let us play together.\"")
    s.append(f"They played with the {obj} until the sun went down. They laughed and had fun.")
    s.append(f"{hero.name} learned that sharing is better than playing alone. Sharing makes everyone happy.")
    return " ".join(s)


def story_fear(rng, hero, friend, place, obj):
    fear, relief = rng.choice(FEARS)
    s = [opening(rng, hero), f"{hero.name} was {hero.trait}, but {hero.he} was afraid of {fear}."]
    s.append(f"One day {hero.name} and {friend.name} went to {place[0]}.")
    s.append(f"When {hero.name} saw {fear}, {hero.he} wanted to go home.")
    s.append(f"\"Do not be scared,\" said {friend.name}. \"I am here with you. Hold my hand.\"")
    s.append(f"{hero.name} held {friend.name}'s hand and took a deep breath.")
    s.append(f"Soon {hero.he} saw that {relief}. {cap(hero.he)} was not afraid any more.")
    s.append(f"{hero.name} felt {rng.choice(FEELINGS_GOOD)}. \"Thank you, {friend.name},\" {hero.he} said. Being brave is good.")
    return " ".join(s)


def story_make(rng, hero, friend, place, obj):
    what, the, stuff, good = rng.choice(MAKES)
    s = [opening(rng, hero), f"{hero.name} wanted to {what}. {cap(hero.he)} asked {friend.name} to help."]
    s.append(f"They got {stuff}. They worked and worked.")
    s.append(rng.choice([f"But then a big wind came and {the} fell down.", f"But then a dog ran by and {the} was ruined.",
                         f"But then it started to rain and {the} was spoiled."]))
    s.append(f"{hero.name} was {rng.choice(FEELINGS_BAD)}. \"Let us try again,\" said {friend.name}.")
    s.append(f"So they tried again. This time {the} was {good}.")
    s.append(f"{hero.name} and {friend.name} were very {rng.choice(FEELINGS_GOOD)}. It is good to try again.")
    return " ".join(s)


def story_help(rng, hero, friend, place, obj):
    where, prep = place
    animal = rng.choice(ANIMALS)
    trouble = rng.choice([("stuck in a tree", "climbed up and helped it down"),
                          ("caught in a net", "pulled the net away"),
                          ("lost and far from home", "walked with it back to its home"),
                          ("hurt its leg", "put a soft bandage on its leg")])
    s = [opening(rng, hero), rng.choice(WEATHER), f"{hero.name} went for a walk {prep} {where}."]
    s.append(f"There {hero.he} saw a {rng.choice(SIZES)} {animal}. The {animal} was {trouble[0]}.")
    s.append(f"\"Poor {animal},\" said {hero.name}. \"I will help you.\"")
    s.append(f"{hero.name} {trouble[1]}. The {animal} was safe now.")
    s.append(f"The {animal} was so happy. It came back every day to play with {hero.name}.")
    s.append(f"{hero.name} felt {rng.choice(FEELINGS_GOOD)}. Kindness is always the best way.")
    return " ".join(s)


PLOTS = [story_lost, story_share, story_fear, story_make, story_help]  # a fixed place or thing picks from those using it


def story(rng, hero=None, place=None, obj=None):
    """One story; hero, place or obj may be fixed (the chat requests)."""
    hero = hero or Who(rng)
    friend = Who(rng)
    while friend.name == hero.name:
        friend = Who(rng)
    plots = PLOTS if obj is None and place is None else [story_lost, story_share] if obj else [story_lost, story_share, story_help, story_fear]
    return rng.choice(plots)(rng, hero, friend, place or rng.choice(PLACES), obj or thing(rng))


def chat(rng, turns=None):
    """A chat: requests for stories about a subject, answered with a story that features it."""
    lines = []
    for _ in range(turns or rng.choice([1, 1, 2])):
        r = rng.random()
        if r < 0.1:
            lines += [f"User: {rng.choice(['Hi!', 'Hello!', 'Hello, who are you?', 'Hi, what can you do?'])}",
                      "Assistant: Hello! I am a little storyteller. Ask me for a story about an animal, a child, "
                      "a place or a toy."]
            continue
        if r < 0.4:
            kind = rng.choice(["girl", "boy", "animal"])
            hero = Who(rng, kind)
            ask = f"a {hero.noun} named {hero.name}" if rng.random() < 0.6 else f"a {hero.noun}"
            text = story(rng, hero=hero)
        elif r < 0.7:
            place = rng.choice(PLACES)
            ask, text = place[0], story(rng, place=place)
        else:
            obj = thing(rng)
            ask, text = f"a {obj}", story(rng, obj=obj)
        req = rng.choice([f"Tell me a story about {ask}.", f"Can you tell me a story about {ask}?",
                          f"Please tell me a story about {ask}.", f"I want a story about {ask}."])
        lines += [f"User: {req}", f"Assistant: {text}"]
    return "\n".join(lines)


def document(rng, chat_share=0.25):
    return chat(rng) if rng.random() < chat_share else story(rng)


def documents(n, seed=0, chat_share=0.25):
    rng = random.Random(seed)
    return [document(rng, chat_share) for _ in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat-share", type=float, default=0.25)
    a = ap.parse_args(argv)
    with open(a.out, "w") as f:
        f.write("\n\n\n".join(documents(a.docs, a.seed, a.chat_share)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
