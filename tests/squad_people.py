"""A tiny SQuAD v1.1 corpus for the tests: people, their birth cities and their jobs."""

import json

PEOPLE = [
    ("Alice", "Paris", "painter"),
    ("Bruno", "Lisbon", "baker"),
    ("Chen", "Shanghai", "surgeon"),
    ("Dmitri", "Moscow", "pilot"),
    ("Eva", "Vienna", "lawyer"),
    ("Farah", "Cairo", "teacher"),
    ("Goran", "Zagreb", "farmer"),
    ("Hana", "Kyoto", "potter"),
    ("Ivan", "Sofia", "tailor"),
    ("Jana", "Prague", "chemist"),
]


def paragraph(people):
  context = " ".join(
      f"{name} was born in {city} and later worked as a {job} for many years."
      for name, city, job in people
  )
  qas = []
  for name, city, job in people:
    for kind, question, answer in (
        ("city", f"Where was {name} born?", city),
        ("job", f"What did {name} work as?", job),
    ):
      start = context.index(f"{name} was born")
      start = context.index(answer, start)
      qas.append(
          {
              "id": f"{name}-{kind}",
              "question": question,
              "answers": [{"text": answer, "answer_start": start}],
          }
      )
  return {"context": context, "qas": qas}


def document(articles):
  return {"version": "1.1", "data": articles}


def write_squad(folder):
  """train: 6 people in two short paragraphs (12 questions); dev: 4 people in one paragraph
  longer than a window (8 questions, several windows each)."""
  folder.mkdir(parents=True, exist_ok=True)
  train_doc = document(
      [
          {"title": "People_A", "paragraphs": [paragraph(PEOPLE[0:3])]},
          {"title": "People_B", "paragraphs": [paragraph(PEOPLE[3:6])]},
      ]
  )
  dev_doc = document([{"title": "People_C", "paragraphs": [paragraph(PEOPLE[6:10])]}])
  (folder / "train-v1.1.json").write_text(json.dumps(train_doc), encoding="utf-8")
  (folder / "dev-v1.1.json").write_text(json.dumps(dev_doc), encoding="utf-8")
  return folder
